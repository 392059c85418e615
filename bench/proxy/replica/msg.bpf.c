// SPDX-License-Identifier: GPL-2.0
/*
 * An experiment for issue 8, not product code (see msg.c): forwarding on the client's own
 * socket. A sockops program on the cgroup puts every local client socket that connects to
 * the proxy port into `clients`; an sk_msg program on those sockets redirects each send
 * straight to the egress of the proxy's server socket (in the sender's own context, no
 * kernel worker, no loopback hop through the proxy's accepted socket); the server socket's
 * stream verdict redirects replies into the client socket's receive queue (one kernel
 * worker hand-off). Keys are local ports: enough on one loopback test bed.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

/* The proxy's listening port, set by the loader before load. */
const volatile __u32 listen_port = 0;

/* Client sockets, by their local port; sk_msg attached. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} clients SEC(".maps");

/* The proxy's server sockets, by their local port; stream verdict attached. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} servers SEC(".maps");

/* client port -> server socket port, and back; written by the proxy once connected. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} to_server SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} to_client SEC(".maps");

SEC("sockops")
int client_established(struct bpf_sock_ops *ops)
{
	if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ops->family == 2 /* AF_INET */ &&
	    bpf_ntohl(ops->remote_port) == listen_port) {
		__u32 key = ops->local_port;
		bpf_sock_hash_update(ops, &clients, &key, BPF_ANY);
	}
	return 1;
}

SEC("sk_msg")
int client_send(struct sk_msg_md *msg)
{
	__u32 key = msg->local_port;
	__u32 *server = bpf_map_lookup_elem(&to_server, &key);
	if (!server)
		return SK_PASS; /* not connected yet: the proxy reads it in userspace */
	__u32 s = *server;
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
