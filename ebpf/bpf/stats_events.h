// SPDX-License-Identifier: GPL-2.0
/*
 * What the kernel-forwarding programs (sockmap.bpf.c, client_socket.bpf.c) share for talking to the
 * proxy: per-CPU counters `stats` (STAT_COUNT of them; the loader sums them over CPUs) and an
 * event ring `events` of {socket cookie, kind} records (ebpf/src/ring.rs decodes them). A
 * full ring loses the event and counts STAT_LOST_EVENTS; the proxy sees that counter move
 * and looks at every connection. Declare STAT_COUNT and STAT_LOST_EVENTS (enum constants)
 * before including.
 */
#ifndef TENDRIL_STATS_EVENTS_H
#define TENDRIL_STATS_EVENTS_H

struct event {
	__u64 cookie; /* the socket the event is about */
	__u32 kind;   /* the program's EVENT_* */
	__u32 pad;
};

/* Never used: makes clang emit struct event into the object's BTF (a local of an inlined
 * function is not), for the loaders' layout test (ebpf/src/layout.rs). An 8-byte .bss. */
const struct event *__event_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += 1;
}

static __always_inline void notify(__u64 cookie, __u32 kind)
{
	struct event e = { .cookie = cookie, .kind = kind };
	if (bpf_ringbuf_output(&events, &e, sizeof(e), 0))
		count(STAT_LOST_EVENTS);
}

#endif
