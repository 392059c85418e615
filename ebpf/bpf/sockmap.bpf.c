// SPDX-License-Identifier: GPL-2.0
/*
 * tendril kernel forwarding: once the proxy has connected a client to the master, both
 * sockets join the `peers` sockhash and this stream verdict moves every skb that arrives on
 * one of them to the other with an egress redirect, so established traffic never comes up
 * to the proxy.
 *
 * Keys are socket cookies (SO_COOKIE: unique per socket, never reused): `peers[c]` holds the
 * peer of the socket whose cookie is `c`, so a socket finds its peer by its own cookie, with
 * no address parsing, for IPv4 and IPv6 alike.
 *
 * Backpressure. An egress redirect queues the skb on the peer's psock backlog, which the
 * kernel does not bound: a client that reads nothing would let the server push a whole
 * result into kernel memory. So each direction counts what it handed to the peer and reads
 * how much of it the peer's TCP has had acknowledged (`bytes_acked`); what lies between is
 * held in the kernel for this direction (psock backlog plus the peer's send queue). When a
 * redirect would push that past `limit`, the direction switches to USER mode: skbs are
 * passed up to the source socket's own receive path (charged to its receive buffer, so its
 * TCP window closes when the proxy does not read) and the proxy is told through `events`.
 * The proxy then reads the direction and writes it to the peer itself, under ordinary TCP
 * flow control, once the backlog ahead of it has drained. The verdict switches back to
 * KERNEL mode on a later skb once the proxy has written everything that was passed up and
 * the held bytes fell under half the limit. Order is kept: passed bytes are written by the
 * proxy only after the backlog drained, and redirects resume only after every passed byte
 * was written.
 *
 * Repeated bytes. The kernel hands the verdict whole skbs (tcp_read_skb) without trimming
 * bytes it delivered before: an skb the proxy had partly read in userspace before the socket
 * joined, or, after a loss on loopback (the receiver pruned its queues under memory
 * pressure), a retransmission that filled the hole and starts before the next expected
 * byte. Those bytes would reach the peer twice. Worse, the kernel then advances the socket's
 * copied_seq past rcv_nxt by the repeated length, and tcp_data_ready stops waking the
 * verdict until that much new data has arrived: the tail of every later burst would sit
 * unread. So each direction follows the TCP sequence of its source (TCP_SKB_CB(skb)->seq,
 * from the socket's copied_seq at the first skb) and cuts the repeated head off the skb
 * (bpf_skb_adjust_room, 4095 bytes per call) before redirecting or passing it: the peer
 * gets each byte once and copied_seq stays in step. An skb wholly seen before is dropped
 * (TCP does not queue those; defensive).
 *
 * A verdict for one socket runs serialised under that socket's lock, so its direction's
 * counters need no atomics; the proxy only reads them.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "skb_seq.h"

char LICENSE[] SEC("license") = "GPL";

/* The constants the loader shares are enums, so that the object's BTF carries their
 * values (ebpf/src/layout.rs checks the loader's against them). */
enum direction_mode {
	MODE_KERNEL = 0,
	MODE_USER = 1,
	MODE_FAILED = 2,
	MODE_JOINING = 3, /* created by the proxy; no skb seen yet */
};

enum sockmap_event {
	EVENT_PAUSED = 1,
	EVENT_FAILED = 2,
};

#define MAX_PAIRS_DEFAULT 65536

/* One direction, keyed by the cookie of the socket it reads from. Created by the proxy
 * before the socket joins `peers`; afterwards only this program writes it. */
struct direction {
	__u64 base;       /* bytes the proxy wrote to the peer before the socket joined */
	__u64 limit;      /* most bytes held in the kernel for this direction */
	__u64 redirected; /* bytes redirected to the peer */
	__u64 passed;     /* bytes passed up to the proxy (USER mode) */
	__u32 mode;       /* MODE_* */
	__u32 pauses;     /* KERNEL -> USER switches */
	__u64 peak;       /* most bytes seen held when the peer was looked at */
	__u64 acked;      /* the peer's bytes_acked when last looked at (it only grows) */
	__u32 next_seq;   /* TCP sequence number of the next byte not seen yet */
	__u32 seq_known;  /* next_seq is set */
	__u64 trimmed;    /* repeated bytes cut off the head of skbs */
	__u64 dropped;    /* repeated bytes in skbs dropped whole */
};

/* What the proxy reports for a direction: bytes of passed data it wrote to the peer. */
struct forwarded {
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_PAIRS_DEFAULT);
	__type(key, __u64);
	__type(value, __u64);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PAIRS_DEFAULT);
	__type(key, __u64);
	__type(value, struct direction);
} directions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PAIRS_DEFAULT);
	__type(key, __u64);
	__type(value, struct forwarded);
} forwarded SEC(".maps");

/* Global counters: redirected skbs, passed skbs, pauses, resumes, failures, lost events. */
enum sockmap_stat {
	STAT_REDIRECTS = 0,
	STAT_PASSES = 1,
	STAT_PAUSES = 2,
	STAT_RESUMES = 3,
	STAT_FAILURES = 4,
	STAT_LOST_EVENTS = 5,
	STAT_UNKNOWN = 6,
	STAT_REPEATED = 7, /* skbs that repeated bytes already seen (dropped or trimmed) */
	STAT_COUNT = 8,
};

#include "stats_events.h"

/* Bytes the peer's TCP has had acknowledged, or 0 when the peer is gone. */
static __always_inline int peer_acked(__u64 *key, __u64 *acked)
{
	struct bpf_sock *peer = bpf_map_lookup_elem(&peers, key);
	if (!peer)
		return -1;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(peer);
	*acked = tp ? tp->bytes_acked : 0;
	bpf_sk_release(peer);
	return 0;
}

SEC("sk_skb/stream_verdict")
int forward(struct __sk_buff *skb)
{
	__u64 key = bpf_get_socket_cookie(skb);
	__u32 len = skb->len;
	struct direction *d = bpf_map_lookup_elem(&directions, &key);
	if (!d) {
		/* Not a socket the proxy registered: let it read the data itself. */
		count(STAT_UNKNOWN);
		return SK_PASS;
	}
	if (d->mode == MODE_FAILED)
		return SK_DROP;
	if (len == 0) {
		/* The skb that carried a bare FIN: TCP has already recorded the shutdown, which the
		 * proxy forwards as a half-close once the data before it is out. Redirected, the
		 * empty skb would make the peer's backlog worker report EPIPE on the peer. */
		return SK_DROP;
	}
	/* Bytes already seen (see Repeated bytes above). */
	__u32 cut = 0;
	int seen = skip_seen(skb, &d->next_seq, &d->seq_known, &cut);
	if (seen != SKB_NEW || cut)
		count(STAT_REPEATED);
	if (seen == SKB_SEEN) {
		d->dropped += len;
		return SK_DROP;
	}
	if (seen == SKB_UNCUT) {
		/* No memory to pull the head: better cut the connection than repeat bytes. */
		goto failed;
	}
	d->trimmed += cut;
	len = skb->len;
	if (d->mode == MODE_JOINING) {
		/* First skb of this direction. If the peer has not joined yet, keep the bytes, in
		 * order, for the proxy (USER mode) instead of dropping them. */
		if (bpf_sk_redirect_hash(skb, &peers, &key, 0) == SK_PASS) {
			d->mode = MODE_KERNEL;
			d->redirected += len;
			count(STAT_REDIRECTS);
			return SK_PASS;
		}
		d->mode = MODE_USER;
		notify(key, EVENT_PAUSED);
		goto pass;
	}
	__u64 handed = d->base + d->redirected;
	__u64 acked = d->acked;
	if (d->mode == MODE_KERNEL) {
		/* In KERNEL mode everything ever passed up was written by the proxy (that is the
		 * condition for coming back), so `passed` stands for it. */
		handed += d->passed;
		/* With the last acked count, `held` can only be overestimated: look at the peer
		 * only when the estimate reaches the limit (once per `limit` bytes when the peer
		 * keeps up), so the common path is one hash lookup and the redirect. */
		__u64 held = handed > acked ? handed - acked : 0;
		if (held + len > d->limit) {
			if (peer_acked(&key, &acked) < 0)
				goto failed;
			d->acked = acked;
			held = handed > acked ? handed - acked : 0;
			if (held > d->peak)
				d->peak = held;
			if (held + len > d->limit) {
				d->mode = MODE_USER;
				d->pauses += 1;
				count(STAT_PAUSES);
				notify(key, EVENT_PAUSED);
				goto pass;
			}
		}
		goto redirect;
	}
	/* USER mode: come back once the proxy wrote everything passed up and the peer caught
	 * up to half the limit. */
	if (peer_acked(&key, &acked) < 0) {
		/* The peer is not (or no longer) in the map: keep passing up. */
		goto pass;
	}
	d->acked = acked;
	struct forwarded *f = bpf_map_lookup_elem(&forwarded, &key);
	__u64 written = f ? f->bytes : 0;
	handed += written;
	__u64 held = handed > acked ? handed - acked : 0;
	if (written == d->passed && held < d->limit / 2) {
		d->mode = MODE_KERNEL;
		count(STAT_RESUMES);
		goto redirect;
	}
pass:
	d->passed += len;
	count(STAT_PASSES);
	return SK_PASS;
redirect:
	if (bpf_sk_redirect_hash(skb, &peers, &key, 0) != SK_PASS)
		goto failed;
	d->redirected += len;
	count(STAT_REDIRECTS);
	return SK_PASS;
failed:
	/* The peer left the map (closed or fenced), or a repeated head could not be cut: this
	 * direction cannot continue. The proxy closes the pair when it hears. */
	d->mode = MODE_FAILED;
	count(STAT_FAILURES);
	notify(key, EVENT_FAILED);
	return SK_DROP;
}

/* Never used: makes clang emit the constants' enums into the object's BTF, for the loader's
 * layout test (ebpf/src/layout.rs). An 8-byte .bss, after every other global. */
const struct {
	enum direction_mode mode;
	enum sockmap_event event;
	enum sockmap_stat stat;
} *__constants_btf __attribute__((unused));
