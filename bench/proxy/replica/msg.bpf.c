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
 * No receive-side bound: a client that stops reading lets replies pile up in its psock.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

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

SEC("sk_skb/stream_verdict")
int server_receive(struct __sk_buff *skb)
{
	__u32 key = skb->local_port;
	__u32 *client = bpf_map_lookup_elem(&to_client, &key);
	if (!client || skb->len == 0)
		return SK_DROP;
	__u32 c = *client;
	return bpf_sk_redirect_hash(skb, &clients, &c, BPF_F_INGRESS);
}
