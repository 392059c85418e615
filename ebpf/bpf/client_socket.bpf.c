// SPDX-License-Identifier: GPL-2.0
/*
 * tendril kernel forwarding for clients on the proxy's own host: forwarding on the client's
 * own socket. sockmap.bpf.c joins the proxy's two sockets (accepted and server) and redirects
 * between them; for a client in the proxy's network namespace this program goes one hop
 * further and takes the accepted socket out of the data path:
 *
 * - a sockops program on the cgroup v2 root puts every socket that connects to the proxy's
 *   listening port into `clients` (keyed by network namespace and the connection's four
 *   addresses, so the proxy finds it from its accepted socket);
 * - an sk_msg program on those sockets redirects each send straight to the egress of the
 *   proxy's server socket, synchronously in the client's sendmsg (no kernel worker, no
 *   loopback hop through the accepted socket) once the proxy has routed the connection;
 * - the server socket's stream verdict redirects replies into the client socket's receive
 *   queue (BPF_F_INGRESS).
 * The accepted socket stays open: it carries what the client sent before the route existed
 * (the startup packet), whatever the bounds below pass to the ordinary path, and the
 * client's FIN.
 *
 * Send-side bound. A redirect into a backed-up server socket fails at once and the client's
 * own socket stays writable, so the client would spin while PostgreSQL stalls. The sk_msg
 * program cannot look at the server socket (sk_msg programs have no bpf_sk_release), so the
 * sockops RTT callback follows the server socket's acknowledged bytes (the proxy's own
 * connections ask for it at connect) and the sk_msg program passes sends to the accepted
 * socket, where TCP flow control holds the client, once more than `send_limit` bytes are
 * unacknowledged. It goes back to redirecting only when the proxy has written every passed
 * byte to the server socket and the server caught up to half the limit: redirected bytes are
 * in the server socket's queue when the client's sendmsg returns, so nothing passed later
 * overtakes them, and nothing redirected overtakes passed bytes. A new client starts in the
 * passing state, so bytes sent before the route existed are the proxy's to forward first.
 *
 * Receive-side bound. The kernel's backlog worker delivers redirected replies into the
 * client socket and holds them without bound when the client stops reading. So the verdict
 * looks at the client's psock (kernel internals read through BTF: msg_tot_len, the backlog
 * length, whether the backlog worker runs) once per CHECK_EVERY redirected bytes and, past
 * `recv_limit`, pauses: it passes replies to the server socket's own queue, where they count
 * against its receive buffer and its TCP window closes (DRAINING). A timer checks every
 * millisecond until the client's backlog is empty, the worker idle and the client has read
 * every redirected byte, then tells the proxy (USER): the proxy copies the passed replies
 * through the accepted socket. (Read, not just delivered: a read on the client socket takes
 * only from the redirected queue while that holds anything, and an edge-triggered client
 * such as tokio takes the short read to mean that its socket is empty; bytes that reached
 * the TCP queue meanwhile would wait for a wake-up that already came.) The verdict
 * redirects again once the proxy wrote every passed byte, the accepted socket's data was
 * acknowledged and the client read its TCP queue, so each byte reaches the client in order.
 * A pause lowers the proxy's allowance to what was passed before it: bytes passed while
 * DRAINING wait until the backlog ahead of them was delivered.
 *
 * Close ordering. The server's FIN reaches the client through the accepted socket, which the
 * proxy half-closes; replies still in the client's backlog would be overtaken. So the verdict
 * notes the FIN and the timer reports when the backlog is empty (DELIVERED); the proxy
 * half-closes only then. A reset of the server socket leaves no skb for the verdict to see:
 * the proxy, told by its socket, asks probe_client (run from userspace) whether the client's
 * backlog is empty before it cuts the connection, so what the backend sent before the reset
 * (PostgreSQL's last ErrorResponse, sent just before it closes with unread input) still
 * reaches the client ahead of the end. The client's FIN comes through the accepted socket
 * after every byte it sent (redirected ones are already in the server socket's queue).
 *
 * Direct replies. When PostgreSQL runs on the proxy's host too, the replies' last hand-off
 * (the verdict's redirect goes through the client psock's backlog, delivered by a kernel
 * worker) can go: the proxy's workers' connects are noted (TCP_CONNECT_CB, thread ids in
 * `connectors`), the backend's side of each joins `backends` at its passive establish, and
 * an sk_msg program on it redirects each send straight into the client socket's receive
 * queue, synchronously in PostgreSQL's sendmsg. A route starts with direct replies off:
 * the backend's sends take TCP to the server socket and the verdict (counted on both
 * sides); the backlog check turns them on once the verdict has seen every byte the backend
 * sent that way, the client's backlog is empty and the client holds little, so nothing
 * overtakes. Every CHECK_EVERY direct bytes they go off again: the next bytes take the
 * verdict, which looks at what the client holds (the receive-side bound), and the check
 * turns them back on. A pause, the server's FIN or a failed redirect turns them off too.
 *
 * Repeated bytes: see sockmap.bpf.c; the reply direction trims them the same way.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "skb_seq.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before load (one struct, so its layout is fixed). */
struct config {
	__u32 listen_ip[4]; /* IPv4 mapped to IPv6, network order; all zero: any address */
	__u32 listen_port;  /* host order */
	__u32 proxy_tgid;   /* the proxy's process: its connects are followed */
	__u64 send_limit;   /* most unacknowledged bytes redirected to a server socket */
	__u64 recv_limit;   /* most reply bytes held for a client that does not read */
	__u32 read_only_port; /* host order; the read-only listener's, same address; 0: none */
};
const volatile struct config cfg = {};

#define MAX_CLIENTS_DEFAULT 65536
/* The psock is looked at once per this many redirected bytes, not per skb: replies of a few
 * hundred bytes cost one map look-up each, and the bound grows by this much. */
#define CHECK_EVERY (256 * 1024)

#define TCPHDR_FIN 0x01

/* A connection, from the client's side: its network namespace and four addresses. */
struct client_key {
	__u64 netns;
	__u32 client_ip[4];
	__u32 proxy_ip[4];
	__u32 client_port; /* host order */
	__u32 proxy_port;  /* host order */
};

/* Client sockets (sk_msg attached). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, struct client_key);
	__type(value, __u64);
} clients SEC(".maps");

/* A client socket's send accounting, made at connect and freed with the socket. */
struct sends {
	__u64 cookie;     /* the client socket's cookie: a route is this socket's only if it names it */
	__u64 redirected; /* bytes redirected to the server socket */
	__u64 passed;     /* bytes passed to the ordinary path (the accepted socket) */
	__u32 redirecting;
	__u32 pauses;
};
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sends);
} client_sends SEC(".maps");

/* Clients whose socket was in blocking mode at their last send before the route. The
 * kernel's receive path for a socket in a sockmap (tcp_bpf_recvmsg) can end a blocking read
 * with EAGAIN when the reader is woken without data (for instance by write space freed for
 * a writer blocked on the same socket); a non-blocking reader expects EAGAIN at any time, a
 * blocking one takes it as an error. So the proxy takes such clients out of `clients` and
 * forwards them on its own sockets. The mode is looked at on a send, not at connect: many
 * clients connect in blocking mode and switch right after. The proxy routes a client only
 * after its first bytes arrived, so every client has an entry or not by then. LRU: a client
 * that never gets routed leaves no trace.
 * An entry only matters between a client's first send and its route (the proxy deletes it
 * then), so the map holds that many handshakes, not every connection (LRU maps are
 * preallocated: 8192 entries are about 1 MiB of kernel memory, the full 65536 eight). */
#define MAX_HANDSHAKES 8192
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_HANDSHAKES);
	__type(key, struct client_key);
	__type(value, __u32);
} blocking SEC(".maps");

/* Backend sockets on this host. When PostgreSQL runs on the proxy's host, its side of each
 * of the proxy's server connections joins `backends` (recognised at its passive establish by
 * the four addresses the proxy's connect left in `proxy_connects`), and an sk_msg program on
 * it redirects replies straight into the client socket's receive queue, synchronously in
 * PostgreSQL's sendmsg: no loopback hop, no kernel worker (see "Direct replies"). Keys name
 * the connecting side as `client` and the listening side as `proxy`. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_HANDSHAKES);
	__type(key, struct client_key);
	__type(value, __u32);
} proxy_connects SEC(".maps");
/* The proxy's threads that connect to backends (its workers), by thread id, written by the
 * proxy: its other connections (the store's) are left alone. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} connectors SEC(".maps");
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, struct client_key);
	__type(value, __u64);
} backends SEC(".maps");
/* A backend socket's count of bytes sent the ordinary way (TCP to the server socket). */
struct backend_sends {
	__u64 passed;
};
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct backend_sends);
} backend_sent SEC(".maps");
/* Written by the proxy: a routed connection's backend side -> the server socket's cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, struct client_key);
	__type(value, __u64);
} backend_routes SEC(".maps");

/* Written by the proxy only (replaced whole, so freed after a grace period: no prealloc). */
struct route {
	__u64 server;      /* the server socket's cookie */
	__u64 client;      /* the client socket's cookie (four addresses can be reused) */
	__u64 from_client; /* bytes the proxy read from the accepted socket and wrote to the server */
	__u64 to_server;   /* bytes the proxy wrote to the server socket */
};
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, struct client_key);
	__type(value, struct route);
} routes SEC(".maps");

/* The proxy's server sockets by cookie (stream verdict attached), and the accepted socket of
 * each, by the server socket's cookie (no program: read by the resume check). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, __u64);
	__type(value, __u64);
} servers SEC(".maps");
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, __u64);
	__type(value, __u64);
} accepted SEC(".maps");

/* Server socket cookie -> its bytes_acked, kept by the RTT callback (entry made by the proxy). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, __u64);
	__type(value, __u64);
} server_acked SEC(".maps");

/* The constants the loader shares are enums, so that the object's BTF carries their
 * values (ebpf/src/layout.rs checks the loader's against them). */
enum reply_mode {
	R_KERNEL = 0,
	R_DRAINING = 1,
	R_USER = 2,
	R_FAILED = 3,
};

/* The reply direction, by the server socket's cookie: made by the proxy at the join, then
 * written only by this program. */
struct reply {
	struct client_key client;
	__u64 server;     /* the server socket's cookie */
	__u64 redirected; /* reply bytes redirected to the client socket */
	__u64 passed;     /* reply bytes passed to the server socket's own queue */
	__u64 allow;      /* the proxy may write passed bytes up to this count */
	__u64 unchecked;  /* bytes redirected since the client's psock was last looked at */
	__u64 peak;       /* most bytes seen held for the client */
	__u32 mode;       /* R_* */
	__u32 pauses;
	__u32 next_seq;   /* TCP sequence of the next reply byte not seen yet */
	__u32 seq_known;
	__u32 fin;        /* the server's FIN was seen */
	__u32 delivered;  /* after the FIN: everything redirected reached the client */
	__u64 queued;      /* in `pending` (set and cleared atomically: 64-bit atomics) */
	__u32 queued_tick; /* the checker's tick that queued it again (0: a verdict did) */
	__u32 pad;
	/* Direct replies (a backend on this host): */
	__u64 direct;         /* reply bytes the backend redirected into the client socket */
	__u64 backend_passed; /* bytes the backend sent the ordinary way (its count) */
	__u64 since_check;    /* direct bytes since the client's psock was last looked at */
	__u32 backend_joined; /* the backend's program has seen this route */
	__u32 direct_on;      /* the backend redirects into the client socket */
};
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, __u64);
	__type(value, struct reply);
} replies SEC(".maps");

/* Backlog checks. One timer for every connection that waits for a client's backlog to
 * drain (a pause, or the server's FIN): a timer per connection would allocate at every
 * route, and that allocation (it cannot sleep) fails now and then for hundreds of
 * milliseconds. The timer is set up once, by the proxy at load (init_checker); a verdict
 * queues the connection's cookie in `pending` and arms the timer if it is not armed; every
 * millisecond while anything is queued, the timer looks at each queued connection once. */
struct checker {
	struct bpf_timer timer;
	__u64 armed; /* set and cleared atomically (64-bit atomics) */
	__u32 tick;  /* runs so far (written by the timer only) */
	__u32 pad;
};
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct checker);
} checker SEC(".maps");
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(value, __u64);
} pending SEC(".maps");

/* Server socket cookie -> bytes of passed replies the proxy wrote to the accepted socket. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_CLIENTS_DEFAULT);
	__type(key, __u64);
	__type(value, __u64);
} reply_written SEC(".maps");

enum client_socket_event {
	EVENT_DRAINED = 1,   /* the client's backlog drained: copy the passed replies */
	EVENT_DELIVERED = 2, /* after the server's FIN, everything reached the client */
	EVENT_FAILED = 3,    /* a reply could not be delivered: close the connection */
	EVENT_PAUSED = 4,    /* replies now wait in the server socket: fix its receive buffer */
};

enum client_socket_stat {
	STAT_CLIENTS = 0,      /* client sockets put into `clients` */
	STAT_CLIENTS_FULL = 1, /* client sockets left out (map full) */
	STAT_SENDS_REDIRECTED = 2,
	STAT_SENDS_PASSED = 3,
	STAT_SEND_PAUSES = 4,
	STAT_REPLIES_REDIRECTED = 5,
	STAT_REPLIES_PASSED = 6,
	STAT_REPLY_PAUSES = 7,
	STAT_FAILURES = 8,
	STAT_LOST_EVENTS = 9,
	STAT_REPEATED = 10,
	STAT_TIMER_FAILURES = 11,
	STAT_REPLIES_DIRECT = 12, /* backend sends redirected straight into a client socket */
	STAT_BACKENDS = 13,       /* backend sockets on this host put into `backends` */
	STAT_COUNT = 14,
};
#include "stats_events.h"

/* Reads a context field into a register: the compiler would otherwise turn a choice between
 * two fields into arithmetic on the context pointer, which the verifier refuses. */
#define CTX(x)                                                                                     \
	({                                                                                         \
		__u32 _v = (x);                                                                    \
		asm volatile("" : "+r"(_v));                                                       \
		_v;                                                                                \
	})

static __always_inline void set_ip(__u32 *out, __u32 family, __u32 ip4, const __u32 *ip6)
{
	if (family == 2 /* AF_INET */) {
		out[0] = 0;
		out[1] = 0;
		out[2] = bpf_htonl(0xffff);
		out[3] = ip4;
	} else {
		out[0] = ip6[0];
		out[1] = ip6[1];
		out[2] = ip6[2];
		out[3] = ip6[3];
	}
}

#define O_NONBLOCK_FLAG 04000

/* Whether the socket's file is in blocking mode (no O_NONBLOCK). */
static __always_inline int socket_blocks(struct bpf_sock *sk)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	struct sock *ks = (struct sock *)tp;
	unsigned int flags = BPF_CORE_READ(ks, sk_socket, file, f_flags);
	return !(flags & O_NONBLOCK_FLAG);
}

/* The addresses of a sockops or sk_msg context, which name them the same way (ports: local
 * in host order, remote in network order), as locals for fill_key. */
#define CTX_ADDRS(ctx)                                                                         \
	__u32 family = CTX((ctx)->family);                                                     \
	__u32 l6[4] = { CTX((ctx)->local_ip6[0]), CTX((ctx)->local_ip6[1]),                    \
			CTX((ctx)->local_ip6[2]), CTX((ctx)->local_ip6[3]) };                  \
	__u32 r6[4] = { CTX((ctx)->remote_ip6[0]), CTX((ctx)->remote_ip6[1]),                  \
			CTX((ctx)->remote_ip6[2]), CTX((ctx)->remote_ip6[3]) };                \
	__u32 l4 = CTX((ctx)->local_ip4), r4 = CTX((ctx)->remote_ip4);                         \
	__u32 lport = (ctx)->local_port, rport = bpf_ntohl((ctx)->remote_port)

/* A connection's key from CTX_ADDRS' locals: `local_connects` says whether this socket is
 * the connecting side (the key's `client`). */
#define fill_key(key, local_connects, ns)                                                   \
	do {                                                                                   \
		if (local_connects) {                                                          \
			set_ip((key)->client_ip, family, l4, l6);                              \
			set_ip((key)->proxy_ip, family, r4, r6);                               \
			(key)->client_port = lport;                                            \
			(key)->proxy_port = rport;                                             \
		} else {                                                                       \
			set_ip((key)->client_ip, family, r4, r6);                              \
			set_ip((key)->proxy_ip, family, l4, l6);                               \
			(key)->client_port = rport;                                            \
			(key)->proxy_port = lport;                                             \
		}                                                                              \
		(key)->netns = (ns);                                                           \
	} while (0)

/* The connection's key from a sockops context; 0 when the family is not TCP/IP. */
static __always_inline int ops_key(struct bpf_sock_ops *ops, struct client_key *key,
				   int local_connects)
{
	CTX_ADDRS(ops);
	if (family != 2 && family != 10)
		return 0;
	fill_key(key, local_connects, bpf_get_netns_cookie(ops));
	return 1;
}

SEC("sockops")
int watch_sockets(struct bpf_sock_ops *ops)
{
	struct client_key key = {};
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		/* connect() runs in the caller's context: the proxy's own connections (to the
		 * master) get their acknowledgements followed, and their addresses noted so a
		 * backend on this host recognises them. */
		__u64 id = bpf_get_current_pid_tgid();
		if ((id >> 32) != cfg.proxy_tgid)
			return 1;
		bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_RTT_CB_FLAG);
		__u32 tid = (__u32)id;
		if (bpf_map_lookup_elem(&connectors, &tid) && ops_key(ops, &key, 1)) {
			__u32 one = 1;
			bpf_map_update_elem(&proxy_connects, &key, &one, BPF_ANY);
		}
		return 1;
	}
	case BPF_SOCK_OPS_RTT_CB: {
		__u64 cookie = bpf_get_socket_cookie(ops);
		__u64 *a = bpf_map_lookup_elem(&server_acked, &cookie);
		if (a)
			*a = ops->bytes_acked;
		return 1;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		/* A backend on this host accepting one of the proxy's connections. */
		if (!ops_key(ops, &key, 0) || !bpf_map_lookup_elem(&proxy_connects, &key))
			return 1;
		bpf_map_delete_elem(&proxy_connects, &key);
		struct bpf_sock *sk = ops->sk;
		if (!sk)
			return 1;
		if (!bpf_sk_storage_get(&backend_sent, sk, 0, BPF_SK_STORAGE_GET_F_CREATE))
			return 1;
		if (bpf_sock_hash_update(ops, &backends, &key, BPF_NOEXIST) == 0)
			count(STAT_BACKENDS);
		return 1;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		break;
	default:
		return 1;
	}
	__u32 port = bpf_ntohl(ops->remote_port);
	if (port != cfg.listen_port && (!cfg.read_only_port || port != cfg.read_only_port))
		return 1;
	if (!ops_key(ops, &key, 1))
		return 1;
	if (cfg.listen_ip[0] | cfg.listen_ip[1] | cfg.listen_ip[2] | cfg.listen_ip[3]) {
		if (key.proxy_ip[0] != cfg.listen_ip[0] || key.proxy_ip[1] != cfg.listen_ip[1] ||
		    key.proxy_ip[2] != cfg.listen_ip[2] || key.proxy_ip[3] != cfg.listen_ip[3])
			return 1;
	}
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return 1;
	struct sends *st = bpf_sk_storage_get(&client_sends, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 1;
	st->cookie = bpf_get_socket_cookie(ops);
	if (bpf_sock_hash_update(ops, &clients, &key, BPF_NOEXIST))
		count(STAT_CLIENTS_FULL);
	else
		count(STAT_CLIENTS);
	return 1;
}

/* The connection's key from an sk_msg context. */
static __always_inline void msg_key(struct sk_msg_md *msg, struct client_key *key,
				    int local_connects)
{
	CTX_ADDRS(msg);
	fill_key(key, local_connects, bpf_get_netns_cookie(msg));
}

SEC("sk_msg")
int client_send(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	struct sends *st = bpf_sk_storage_get(&client_sends, sk, 0, 0);
	if (!st)
		return SK_PASS;
	__u32 size = msg->size;
	struct client_key key = {};
	msg_key(msg, &key, 1);
	struct route *r = bpf_map_lookup_elem(&routes, &key);
	if (r && r->client != st->cookie) {
		/* The route of an earlier connection with the same four addresses, not removed
		 * yet: not this socket's. */
		r = 0;
	}
	if (!r) {
		/* Before the route (the startup packet, authentication): note how the client
		 * reads, for the proxy's choice of path. */
		if (socket_blocks(sk)) {
			__u32 one = 1;
			bpf_map_update_elem(&blocking, &key, &one, BPF_ANY);
		} else {
			bpf_map_delete_elem(&blocking, &key);
		}
		goto pass;
	}
	__u64 server = r->server;
	__u64 *a = bpf_map_lookup_elem(&server_acked, &server);
	__u64 ack = a ? *a : 0;
	__u64 handed = r->to_server + st->redirected;
	__u64 held = handed > ack ? handed - ack : 0;
	if (!st->redirecting) {
		if (r->from_client != st->passed || held >= cfg.send_limit / 2)
			goto pass;
		st->redirecting = 1;
	} else if (held + size > cfg.send_limit) {
		st->redirecting = 0;
		st->pauses++;
		count(STAT_SEND_PAUSES);
		goto pass;
	}
	if (bpf_msg_redirect_hash(msg, &servers, &server, 0) != SK_PASS) {
		/* The server socket left (fence, close): the proxy closes the accepted socket. */
		st->redirecting = 0;
		goto pass;
	}
	st->redirected += size;
	count(STAT_SENDS_REDIRECTED);
	return SK_PASS;
pass:
	st->passed += size;
	count(STAT_SENDS_PASSED);
	return SK_PASS;
}

/* A backend on this host sending on one of the proxy's connections. While the connection's
 * replies flow in the kernel (R_KERNEL) and direct replies are on, each send goes straight
 * into the client socket's receive queue; otherwise it takes the ordinary way (TCP to the
 * server socket, whose verdict deals with it), counted so the backlog check knows when
 * everything sent that way has reached the client and direct replies may start (or start
 * again) without overtaking it. Every CHECK_EVERY direct bytes the direct replies stop: the
 * next bytes go through the verdict, which looks at what the client holds (the bound), and
 * the backlog check turns them on again. */
SEC("sk_msg")
int backend_send(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	struct backend_sends *bs = bpf_sk_storage_get(&backend_sent, sk, 0, 0);
	if (!bs)
		return SK_PASS;
	__u32 size = msg->size;
	struct client_key key = {};
	msg_key(msg, &key, 0);
	bs->passed += size;
	__u64 *server = bpf_map_lookup_elem(&backend_routes, &key);
	if (!server)
		return SK_PASS;
	__u64 cookie = *server;
	struct reply *st = bpf_map_lookup_elem(&replies, &cookie);
	if (!st)
		return SK_PASS;
	if (st->direct_on) {
		struct client_key c = st->client;
		if (st->mode == R_KERNEL && !st->fin && st->since_check + size <= CHECK_EVERY &&
		    bpf_msg_redirect_hash(msg, &clients, &c, BPF_F_INGRESS) == SK_PASS) {
			bs->passed -= size;
			st->since_check += size;
			st->direct += size;
			count(STAT_REPLIES_DIRECT);
			return SK_PASS;
		}
		/* Back to the ordinary way; the verdict looks at the client on its next skb. */
		st->direct_on = 0;
		st->unchecked = CHECK_EVERY;
	}
	st->backend_passed = bs->passed;
	st->backend_joined = 1;
	return SK_PASS;
}

/* The client socket's psock: bytes delivered and unread, skbs not yet delivered, and
 * whether the backlog worker is running. -1 when the client is gone. */
static __always_inline int client_psock(struct client_key *ckey, __u32 *tot, __u32 *qlen,
					int *busy)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&clients, ckey);
	if (!sk)
		return -1;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		struct sock *ks = (struct sock *)tp;
		/* sk_user_data holds the psock with flag bits in the low three bits. */
		unsigned long ud = (unsigned long)BPF_CORE_READ(ks, sk_user_data);
		struct sk_psock *psock = (struct sk_psock *)(ud & ~7UL);
		*tot = BPF_CORE_READ(psock, msg_tot_len);
		*qlen = BPF_CORE_READ(psock, ingress_skb.qlen);
		*busy = BPF_CORE_READ(psock, work_mutex.owner.counter) != 0;
	}
	bpf_sk_release(sk);
	return 0;
}

/* The client has read everything the proxy wrote through the accepted socket. */
static __always_inline int tcp_path_empty(__u64 *server, struct client_key *ckey)
{
	struct bpf_sock *a = bpf_map_lookup_elem(&accepted, server);
	if (!a)
		return 0;
	struct tcp_sock *ap = bpf_skc_to_tcp_sock(a);
	int sent = ap && ap->write_seq == ap->snd_una;
	bpf_sk_release(a);
	if (!sent)
		return 0;
	struct bpf_sock *c = bpf_map_lookup_elem(&clients, ckey);
	if (!c)
		return 0;
	struct tcp_sock *cp = bpf_skc_to_tcp_sock(c);
	int empty = cp && cp->copied_seq == cp->rcv_nxt;
	bpf_sk_release(c);
	return empty;
}

/* Whether the connection still waits for the client's backlog; reports what it waited for
 * when the backlog is empty (or the client gone). */
static __always_inline int still_waiting(struct reply *st)
{
	/* Direct replies may start once everything the backend sent the ordinary way went
	 * through the verdict and was delivered, and the client holds little. */
	int direct_wait = st->backend_joined && !st->direct_on && st->mode == R_KERNEL && !st->fin;
	if (st->mode != R_DRAINING && !(st->fin && !st->delivered) && !direct_wait)
		return 0;
	__u32 tot = 0, qlen = 0;
	int busy = 0;
	struct client_key c = st->client;
	int gone = client_psock(&c, &tot, &qlen, &busy) < 0;
	if (direct_wait) {
		if (gone)
			return 0;
		if (qlen != 0 || busy || st->redirected + st->passed < st->backend_passed)
			return 1;
		/* The bound: at most CHECK_EVERY direct bytes before the next look. */
		if ((__u64)tot + CHECK_EVERY <= cfg.recv_limit) {
			st->since_check = 0;
			st->direct_on = 1;
		}
		/* Otherwise the client holds too much: the verdict's next skb asks again. */
		return 0;
	}
	if (gone || (qlen == 0 && !busy)) {
		/* Replies go through the accepted socket only once the client has read every
		 * redirected byte too (msg_tot_len 0): a read on the client socket takes only from
		 * the redirected queue while that holds anything, so bytes then reaching its TCP
		 * queue would wait behind a read shorter than asked for, which an edge-triggered
		 * client (tokio) takes to mean that its socket is empty: it waits for a wake-up
		 * that already came. (The FIN need not wait: the hang-up it signals is a state
		 * such clients keep until they read the end.) */
		if (st->mode == R_DRAINING && (gone || tot == 0)) {
			st->mode = R_USER;
			st->allow = ~0ULL;
			notify(st->server, EVENT_DRAINED);
		}
		if (st->fin && !st->delivered) {
			st->delivered = 1;
			notify(st->server, EVENT_DELIVERED);
		}
		return st->mode == R_DRAINING;
	}
	return 1;
}

/* The proxy's look at a connection whose server socket ended without a FIN the verdict could
 * see (a reset: TCP drops the connection and no skb marks the end) and, as a check behind the
 * timer, after a FIN: run by the proxy (BPF_PROG_RUN; a tc program for its socket helpers)
 * with the server socket's cookie after an Ethernet header's worth of bytes. Everything the
 * backend sent before the end is in the client socket or in its backlog by then (the verdict
 * and a direct send both run before TCP takes the reset), so once the backlog is empty and its
 * worker idle, the end may follow. Returns PROBE_* bits. */
enum probe_bit {
	PROBE_DELIVERED = 1, /* the client's backlog is empty and its worker idle (or it is gone) */
	PROBE_GONE = 2,      /* the client socket left `clients` (closed) */
	PROBE_HELD = 4,      /* the client holds bytes it has not read */
	PROBE_UNKNOWN = 8,   /* no such connection */
};

/* Bytes in flight to the client through the accepted socket, or unread in the client's TCP
 * queue: the ordinary path's share of what the client holds. */
static __always_inline int tcp_path_holds(__u64 *server, struct client_key *ckey)
{
	int holds = 0;
	struct bpf_sock *a = bpf_map_lookup_elem(&accepted, server);
	if (a) {
		struct tcp_sock *ap = bpf_skc_to_tcp_sock(a);
		if (ap && ap->write_seq != ap->snd_una)
			holds = 1;
		bpf_sk_release(a);
	}
	struct bpf_sock *c = bpf_map_lookup_elem(&clients, ckey);
	if (c) {
		struct tcp_sock *cp = bpf_skc_to_tcp_sock(c);
		if (cp && cp->copied_seq != cp->rcv_nxt)
			holds = 1;
		bpf_sk_release(c);
	}
	return holds;
}

SEC("tc")
int probe_client(struct __sk_buff *skb)
{
	__u64 server = 0;
	if (bpf_skb_load_bytes(skb, 14, &server, sizeof(server)))
		return PROBE_UNKNOWN;
	struct reply *st = bpf_map_lookup_elem(&replies, &server);
	if (!st)
		return PROBE_UNKNOWN;
	struct client_key c = st->client;
	__u32 tot = 0, qlen = 0;
	int busy = 0;
	if (client_psock(&c, &tot, &qlen, &busy) < 0)
		return PROBE_DELIVERED | PROBE_GONE;
	int out = 0;
	if (qlen == 0 && !busy)
		out |= PROBE_DELIVERED;
	if (tot != 0 || qlen != 0 || tcp_path_holds(&server, &c))
		out |= PROBE_HELD;
	return out;
}

/* Upper bound of one timer run: every connection at most once. */
#define MAX_CHECKS (1 << 20)

struct run {
	__u32 tick;
	__u32 again; /* something is still queued: run again in a millisecond */
};

static int run_checks(void *map, __u32 *key, struct checker *g);

static __always_inline void start_checker(struct checker *g)
{
	if (__sync_val_compare_and_swap(&g->armed, 0, 1) != 0)
		return;
	if (bpf_timer_set_callback(&g->timer, run_checks) ||
	    bpf_timer_start(&g->timer, 1000000, 0)) {
		__sync_fetch_and_and(&g->armed, 0);
		count(STAT_TIMER_FAILURES);
	}
}

/* Puts a connection into `pending` unless it is there; `tick` 0 from a verdict. 1: queued
 * now, 0: it was queued already, -1: the queue is full. */
static __always_inline int enqueue(__u64 server, struct reply *st, __u32 tick)
{
	if (__sync_val_compare_and_swap(&st->queued, 0, 1) != 0)
		return 0;
	st->queued_tick = tick;
	if (bpf_map_push_elem(&pending, &server, 0)) {
		__sync_fetch_and_and(&st->queued, 0);
		count(STAT_TIMER_FAILURES);
		return -1;
	}
	return 1;
}

extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __ksym;

/* Looks at the next queued connection; 1 when the run is over. */
static __always_inline int check_next(struct run *r)
{
	__u64 server;
	if (bpf_map_pop_elem(&pending, &server))
		return 1; /* empty */
	struct reply *st = bpf_map_lookup_elem(&replies, &server);
	if (!st)
		return 0; /* the connection is gone */
	if (r->tick && st->queued_tick == r->tick) {
		/* Queued again by this run: the queue has come round. */
		if (bpf_map_push_elem(&pending, &server, 0)) {
			__sync_fetch_and_and(&st->queued, 0);
			count(STAT_TIMER_FAILURES);
		}
		r->again = 1;
		return 1;
	}
	/* Cleared before the look, so a verdict that changes the state after it queues the
	 * connection again itself. */
	__sync_fetch_and_and(&st->queued, 0);
	if (still_waiting(st) && enqueue(server, st, r->tick) >= 0)
		r->again = 1;
	return 0;
}

static int run_checks(void *map, __u32 *key, struct checker *g)
{
	__sync_fetch_and_and(&g->armed, 0);
	__u32 tick = g->tick + 1;
	if (tick == 0)
		tick = 1;
	g->tick = tick;
	struct run r = { .tick = tick, .again = 0 };
	struct bpf_iter_num it;
	int *i;
	bpf_iter_num_new(&it, 0, MAX_CHECKS);
	while ((i = bpf_iter_num_next(&it))) {
		if (check_next(&r))
			break;
	}
	bpf_iter_num_destroy(&it);
	if (r.again)
		start_checker(g);
	return 0;
}

/* The connection waits for the client's backlog: the checker looks at it every ms. */
static __always_inline void start_backlog_check(__u64 server, struct reply *st)
{
	/* Already queued: the timer is armed or running and will look at it (the verdict's
	 * per-skb cost while waiting for direct replies is this one compare-and-swap). */
	if (enqueue(server, st, 0) != 1)
		return;
	__u32 zero = 0;
	struct checker *g = bpf_map_lookup_elem(&checker, &zero);
	if (g)
		start_checker(g);
	else
		count(STAT_TIMER_FAILURES);
}

/* Run by the proxy (BPF_PROG_RUN) once at load: sets up the checker's timer, which
 * allocates (in a syscall program it can be retried; in a verdict it would just fail). */
struct init_args {
	__s64 result;
};
SEC("syscall")
int init_checker(struct init_args *args)
{
	__u32 zero = 0;
	struct checker *g = bpf_map_lookup_elem(&checker, &zero);
	if (!g) {
		args->result = -2 /* ENOENT */;
		return 0;
	}
	args->result = bpf_timer_init(&g->timer, &checker, 1 /* CLOCK_MONOTONIC */);
	return 0;
}

static __always_inline __u32 skb_tcp_flags(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	struct tcp_skb_cb *cb = (struct tcp_skb_cb *)kskb->cb;
	return cb->tcp_flags;
}

SEC("sk_skb/stream_verdict")
int server_receive(struct __sk_buff *skb)
{
	__u64 key = bpf_get_socket_cookie(skb);
	__u32 len = skb->len;
	struct reply *st = bpf_map_lookup_elem(&replies, &key);
	if (!st)
		return SK_PASS;
	if (st->mode == R_FAILED)
		return SK_DROP;
	int fin = skb_tcp_flags(skb) & TCPHDR_FIN;
	if (len == 0) {
		/* The skb of a bare FIN: TCP has recorded the shutdown, which the proxy forwards
		 * once the replies before it reached the client. */
		goto fin_only;
	}
	__u32 cut = 0;
	int seen = skip_seen(skb, &st->next_seq, &st->seq_known, &cut);
	if (seen != SKB_NEW || cut)
		count(STAT_REPEATED);
	if (seen == SKB_SEEN)
		goto fin_only;
	if (seen == SKB_UNCUT)
		goto failed;
	len = skb->len;
	struct client_key c = st->client;
	int verdict;
	if (st->mode == R_KERNEL) {
		if (st->unchecked + len > CHECK_EVERY) {
			__u32 tot = 0, qlen = 0;
			int busy = 0;
			if (client_psock(&c, &tot, &qlen, &busy) < 0)
				goto failed;
			/* Bytes the client holds: delivered and unread, plus at most 64 KiB per skb
			 * still in its backlog; room is left for the next CHECK_EVERY bytes. */
			__u64 held = (__u64)tot + (__u64)qlen * 65536;
			if (held > st->peak)
				st->peak = held;
			if (held + len + CHECK_EVERY > cfg.recv_limit) {
				st->mode = R_DRAINING;
				st->allow = st->passed;
				st->pauses++;
				count(STAT_REPLY_PAUSES);
				start_backlog_check(key, st);
				notify(key, EVENT_PAUSED);
				goto pass;
			}
			st->unchecked = 0;
		}
		goto redirect;
	}
	if (st->mode == R_USER) {
		__u64 *w = bpf_map_lookup_elem(&reply_written, &key);
		if (w && *w == st->passed && tcp_path_empty(&key, &c)) {
			st->mode = R_KERNEL;
			st->unchecked = CHECK_EVERY; /* look at the psock on the next skb */
			goto redirect;
		}
	}
pass:
	st->passed += len;
	count(STAT_REPLIES_PASSED);
	verdict = SK_PASS;
	goto out;
redirect:
	if (bpf_sk_redirect_hash(skb, &clients, &c, BPF_F_INGRESS) != SK_PASS)
		goto failed;
	st->unchecked += len;
	st->redirected += len;
	count(STAT_REPLIES_REDIRECTED);
	verdict = SK_PASS;
	if (st->backend_joined && !st->direct_on && !fin)
		start_backlog_check(key, st);
out:
	if (fin && st->mode == R_KERNEL && !st->fin) {
		st->fin = 1;
		start_backlog_check(key, st);
	} else if (fin) {
		st->fin = 1;
	}
	return verdict;
fin_only:
	if (fin && !st->fin) {
		st->fin = 1;
		if (st->mode == R_KERNEL)
			start_backlog_check(key, st);
	}
	return SK_DROP;
failed:
	/* The client socket is gone (closed), or a repeated head could not be cut: replies
	 * cannot be delivered in order. The proxy closes the connection when it hears. */
	st->mode = R_FAILED;
	count(STAT_FAILURES);
	notify(key, EVENT_FAILED);
	return SK_DROP;
}

/* Never used: makes clang emit the constants' enums into the object's BTF, for the loader's
 * layout test (ebpf/src/layout.rs). An 8-byte .bss, after every other global. */
const struct {
	enum reply_mode reply;
	enum client_socket_event event;
	enum client_socket_stat stat;
	enum probe_bit probe;
} *__constants_btf __attribute__((unused));
