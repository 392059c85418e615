// SPDX-License-Identifier: GPL-2.0
/*
 * tendril socket killer: a TCP socket iterator (iter/tcp) that destroys, with the
 * bpf_sock_destroy() kfunc (Linux >= 6.5), every socket whose remote (or local) address and
 * port match an entry of the `targets` map. In count mode it only counts them.
 *
 * Listeners, TIME_WAIT, NEW_SYN_RECV and CLOSE sockets are skipped: destroying a listener
 * would stop it accepting, and the others are not connections anyone can use (or are already
 * destroyed).
 *
 * The program prints nothing: when a seq_file buffer overflows the kernel runs the program
 * again on the same socket, which would count (or destroy) it twice. The counters in `stats`
 * are the whole result.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

/* Not emitted into vmlinux.h by bpftool 7.1. */
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* Which side of a socket matches the target (bits). An enum, so that the object's BTF
 * carries the values the loader writes (ebpf/src/layout.rs checks them). */
enum match_side {
	MATCH_REMOTE = 1,
	MATCH_LOCAL = 2,
};

#define AF_INET 2
#define AF_INET6 10

#define TCP_ESTABLISHED_ 1
#define TCP_TIME_WAIT_ 6
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10
#define TCP_NEW_SYN_RECV_ 12

struct target {
	__u8 addr[16]; /* IPv6, or IPv4 mapped as ::ffff:a.b.c.d */
	__u16 port;    /* host order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct target);
	__type(value, __u32); /* MATCH_REMOTE | MATCH_LOCAL */
} targets SEC(".maps");

/* 0: visited, 1: matched, 2: destroyed, 3: errors */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Key 0: 0 destroys, 1 only counts. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} mode SEC(".maps");

static __always_inline void bump(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &i);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void fill(struct target *t, struct sock_common *skc, int local)
{
	__builtin_memset(t, 0, sizeof(*t));
	if (skc->skc_family == AF_INET) {
		__u32 a = local ? skc->skc_rcv_saddr : skc->skc_daddr;
		t->addr[10] = 0xff;
		t->addr[11] = 0xff;
		__builtin_memcpy(&t->addr[12], &a, 4);
	} else {
		struct in6_addr a = local ? skc->skc_v6_rcv_saddr : skc->skc_v6_daddr;
		__builtin_memcpy(t->addr, &a, 16);
	}
	t->port = local ? skc->skc_num : bpf_ntohs(skc->skc_dport);
}

SEC("iter/tcp")
int kill_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct target key;
	__u32 *flags;
	__u32 zero = 0;
	__u32 *m;
	int family, state, ret;

	if (!skc)
		return 0;
	bump(0);
	state = skc->skc_state;
	if (state == TCP_LISTEN_ || state == TCP_TIME_WAIT_ || state == TCP_NEW_SYN_RECV_ || state == TCP_CLOSE_)
		return 0;
	family = skc->skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;

	fill(&key, skc, 0);
	flags = bpf_map_lookup_elem(&targets, &key);
	if (!flags || !(*flags & MATCH_REMOTE)) {
		fill(&key, skc, 1);
		flags = bpf_map_lookup_elem(&targets, &key);
		if (!flags || !(*flags & MATCH_LOCAL))
			return 0;
	}
	bump(1);
	m = bpf_map_lookup_elem(&mode, &zero);
	if (m && *m == 1)
		return 0;
	ret = bpf_sock_destroy(skc);
	if (ret == 0)
		bump(2);
	else
		bump(3);
	return 0;
}

/* Never used: makes clang emit the constants' enums into the object's BTF, for the loader's
 * layout test (ebpf/src/layout.rs). An 8-byte .bss (the program's only global data). */
const struct {
	enum match_side match;
} *__constants_btf __attribute__((unused));
