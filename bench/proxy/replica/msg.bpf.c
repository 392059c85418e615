// SPDX-License-Identifier: GPL-2.0
/*
 * An experiment for issue 8, not product code (see msg.c): forwarding on the client's own
 * socket. A sockops program on the cgroup puts every local client socket that connects to
 * the proxy port into `clients`; an sk_msg program on those sockets redirects each send
 * straight to the egress of the proxy's server socket (in the sender's own context, no
 * kernel worker, no loopback hop through the proxy's accepted socket); the server socket's
 * stream verdict redirects replies into the client socket's receive queue (one kernel
 * worker hand-off). Keys are local ports: enough on one loopback test bed.
 *
 * Send-side backpressure: an sk_msg redirect into a full server socket fails at once and
 * the client's own socket stays writable, so a client would spin while PostgreSQL stalls.
 * The sk_msg program cannot look at the server socket (no bpf_sk_release for sk_msg), so
 * the sockops program follows the server socket's acknowledged bytes (its RTT callback)
 * and the sk_msg program passes sends to the ordinary path (the accepted socket, where TCP
 * flow control holds the client) once more than `limit` bytes are unacknowledged. It goes
 * back to redirecting only when the proxy has written everything passed and the server
 * caught up to half the limit: redirected bytes are already in the server socket's queue,
 * so nothing passed later can overtake them, and nothing redirected overtakes passed bytes.
 * Receive side: see the comment above server_receive.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

/* Repeated bytes: tcp_read_skb hands whole skbs, including bytes a retransmission repeats. */
#include "../../../ebpf/bpf/skb_seq.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before load. */
const volatile __u32 listen_port = 0;
const volatile __u32 pg_port = 0;
const volatile __u64 limit = 1 << 20;

#define PORT_MAP(name, kind, value_type)                                                           \
	struct {                                                                                   \
		__uint(type, kind);                                                                \
		__uint(max_entries, 65536);                                                        \
		__type(key, __u32);                                                                \
		__type(value, value_type);                                                         \
	} name SEC(".maps")

/* Client sockets by local port (sk_msg attached); the proxy's server sockets by local port
 * (stream verdict attached). */
PORT_MAP(clients, BPF_MAP_TYPE_SOCKHASH, __u64);
PORT_MAP(servers, BPF_MAP_TYPE_SOCKHASH, __u64);
/* client port -> server socket port, and back; written by the proxy once connected. */
PORT_MAP(to_server, BPF_MAP_TYPE_HASH, __u32);
PORT_MAP(to_client, BPF_MAP_TYPE_HASH, __u32);
/* server socket port -> its bytes_acked, kept by the RTT callback (entry made by the proxy). */
PORT_MAP(acked, BPF_MAP_TYPE_HASH, __u64);
/* client port -> bytes the proxy read from the accepted socket and wrote to the server. */
PORT_MAP(forwarded, BPF_MAP_TYPE_HASH, __u64);

struct sends {
	__u64 redirected; /* bytes redirected to the server socket */
	__u64 passed;     /* bytes passed to the accepted socket */
	__u32 passing;    /* sends go the ordinary path until the proxy caught up */
	__u32 pauses;
};
/* client port -> its send accounting; made when the client connects. */
PORT_MAP(sends, BPF_MAP_TYPE_HASH, struct sends);

SEC("sockops")
int client_established(struct bpf_sock_ops *ops)
{
	if (ops->family != 2 /* AF_INET */)
		return 1;
	__u32 remote = bpf_ntohl(ops->remote_port);
	__u32 key = ops->local_port;
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (remote == listen_port) {
			struct sends zero = {};
			bpf_map_update_elem(&sends, &key, &zero, BPF_ANY);
			bpf_sock_hash_update(ops, &clients, &key, BPF_ANY);
		} else if (remote == pg_port) {
			/* Possibly the proxy's server socket: follow its acknowledgements. */
			bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_RTT_CB_FLAG);
		}
		break;
	case BPF_SOCK_OPS_RTT_CB:
		if (remote == pg_port) {
			__u64 *a = bpf_map_lookup_elem(&acked, &key);
			if (a)
				*a = ops->bytes_acked;
		}
		break;
	}
	return 1;
}

SEC("sk_msg")
int client_send(struct sk_msg_md *msg)
{
	__u32 key = msg->local_port;
	struct sends *st = bpf_map_lookup_elem(&sends, &key);
	if (!st)
		return SK_PASS;
	__u32 *server = bpf_map_lookup_elem(&to_server, &key);
	if (!server) {
		/* Not connected yet (the startup packet): the proxy reads it. */
		st->passed += msg->size;
		return SK_PASS;
	}
	__u32 s = *server;
	__u64 *a = bpf_map_lookup_elem(&acked, &s);
	__u64 *f = bpf_map_lookup_elem(&forwarded, &key);
	__u64 ack = a ? *a : 0, fwd = f ? *f : 0;
	__u64 handed = st->redirected + fwd;
	__u64 held = handed > ack ? handed - ack : 0;
	__u32 size = msg->size;
	if (st->passing) {
		if (fwd == st->passed && held < limit / 2) {
			st->passing = 0;
		} else {
			st->passed += size;
			return SK_PASS;
		}
	} else if (held + size > limit) {
		st->passing = 1;
		st->pauses++;
		st->passed += size;
		return SK_PASS;
	}
	st->redirected += size;
	return bpf_msg_redirect_hash(msg, &servers, &s, 0);
}

/* Receive side. The verdict on the server socket redirects replies into the client
 * socket's receive queue; the kernel's backlog worker delivers them and holds them without
 * bound when the client stops reading. So the verdict looks at the client's psock (a kernel
 * structure, read through BTF) before each redirect and, past `recv_limit`, pauses: it
 * passes replies to the server socket's own queue, where they count against its receive
 * buffer and its TCP window closes (DRAINING). A timer checks every millisecond until the
 * client's backlog is empty and the worker idle, then tells the proxy (USER): the proxy
 * copies the passed replies through the accepted socket. The verdict redirects again once
 * the proxy wrote everything passed, the accepted socket's data was acknowledged and the
 * client has read its TCP queue, so each byte reaches the client in order. A pause also
 * lowers the proxy's allowance to what was passed before it: bytes passed during DRAINING
 * wait until the backlog ahead of them has been delivered. */
const volatile __u64 recv_limit = 1 << 20;
/* The psock is looked at once per this many redirected bytes, not per skb: replies of a
 * few hundred bytes then cost one map look-up each, and the bound grows by this much. */
#define CHECK_EVERY (256 * 1024)

/* Accepted sockets by client port (no program): the proxy's path to the client in USER mode. */
PORT_MAP(accepted, BPF_MAP_TYPE_SOCKHASH, __u64);

#define R_KERNEL 0
#define R_DRAINING 1
#define R_USER 2

struct recv_state {
	struct bpf_timer timer;
	__u32 client;     /* client port */
	__u32 mode;       /* R_* */
	__u64 passed;     /* reply bytes passed to the server socket's own queue */
	__u32 server;     /* server socket port */
	__u32 pauses;
	__u32 next_seq;   /* TCP sequence of the next reply byte not seen yet */
	__u32 seq_known;
	__u64 allow;      /* the proxy may write passed bytes up to this count */
	__u64 unchecked;  /* bytes redirected since the client's psock was last looked at */
};
/* server port -> reply direction state (made by the proxy at join, allow 0) */
PORT_MAP(recv_states, BPF_MAP_TYPE_HASH, struct recv_state);
/* server port -> bytes of passed replies the proxy wrote to the accepted socket */
PORT_MAP(recv_written, BPF_MAP_TYPE_HASH, __u64);

/* Server ports whose client has drained (DRAINING -> USER). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} drained SEC(".maps");

/* The client socket's psock: bytes delivered and unread, skbs not yet delivered, and
 * whether the backlog worker is running. -1 when the client is gone. */
static __always_inline int client_psock(__u32 *ckey, __u32 *tot, __u32 *qlen, int *busy)
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
static __always_inline int tcp_path_empty(__u32 *ckey)
{
	struct bpf_sock *a = bpf_map_lookup_elem(&accepted, ckey);
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

static int drain_check(void *map, __u32 *key, struct recv_state *st)
{
	if (st->mode != R_DRAINING)
		return 0;
	__u32 tot = 0, qlen = 0, c = st->client;
	int busy = 0;
	if (client_psock(&c, &tot, &qlen, &busy) < 0 || (qlen == 0 && !busy)) {
		st->mode = R_USER;
		st->allow = ~0ULL;
		__u32 server = st->server;
		bpf_ringbuf_output(&drained, &server, sizeof(server), 0);
		return 0;
	}
	bpf_timer_start(&st->timer, 1000000, 0);
	return 0;
}

SEC("sk_skb/stream_verdict")
int server_receive(struct __sk_buff *skb)
{
	__u32 key = skb->local_port;
	__u32 len = skb->len;
	struct recv_state *st = bpf_map_lookup_elem(&recv_states, &key);
	if (!st || len == 0)
		return SK_DROP;
	__u32 seq = skb_seq(skb);
	if (!st->seq_known) {
		st->next_seq = first_seq(skb, seq);
		st->seq_known = 1;
	}
	__s32 behind = (__s32)(st->next_seq - seq);
	if (behind > 0) {
		if ((__u32)behind >= len || trim_head(skb, behind) < 0)
			return SK_DROP;
		len = skb->len;
		seq += behind;
	}
	st->next_seq = seq + len;
	__u32 c = st->client;
	if (st->mode == R_KERNEL) {
		if (st->unchecked + len <= CHECK_EVERY) {
			st->unchecked += len;
			return bpf_sk_redirect_hash(skb, &clients, &c, BPF_F_INGRESS);
		}
		__u32 tot = 0, qlen = 0;
		int busy = 0;
		if (client_psock(&c, &tot, &qlen, &busy) < 0)
			return SK_DROP;
		/* Bytes the client holds: delivered and unread, plus at most 64 KiB per skb
		 * still in its backlog; room is left for the next CHECK_EVERY bytes. */
		if ((__u64)tot + (__u64)qlen * 65536 + len + CHECK_EVERY <= recv_limit) {
			st->unchecked = len;
			return bpf_sk_redirect_hash(skb, &clients, &c, BPF_F_INGRESS);
		}
		st->mode = R_DRAINING;
		st->allow = st->passed;
		st->pauses++;
		bpf_timer_init(&st->timer, &recv_states, 1 /* CLOCK_MONOTONIC */);
		bpf_timer_set_callback(&st->timer, drain_check);
		bpf_timer_start(&st->timer, 1000000, 0);
	} else if (st->mode == R_USER) {
		__u64 *w = bpf_map_lookup_elem(&recv_written, &key);
		if (w && *w == st->passed && tcp_path_empty(&c)) {
			st->mode = R_KERNEL;
			st->unchecked = CHECK_EVERY; /* look at the psock on the next skb */
			return bpf_sk_redirect_hash(skb, &clients, &c, BPF_F_INGRESS);
		}
	}
	st->passed += len;
	return SK_PASS;
}
