// SPDX-License-Identifier: GPL-2.0
/*
 * The feasibility probe's sockmap program, rebuilt for comparison (see replica.c): one
 * stream verdict that redirects every skb to the peer's egress, nothing else. tendril's own
 * program (ebpf/bpf/sockmap.bpf.c) adds backpressure, repeated-byte trimming and counters;
 * benchmarking both in the same rounds shows what those cost.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} peers SEC(".maps");

SEC("sk_skb/stream_verdict")
int forward(struct __sk_buff *skb)
{
	__u64 key = bpf_get_socket_cookie(skb);
	if (skb->len == 0)
		return SK_DROP;
	return bpf_sk_redirect_hash(skb, &peers, &key, 0);
}
