// SPDX-License-Identifier: GPL-2.0
/*
 * Following a TCP source's sequence in a stream verdict (see "Repeated bytes" in
 * sockmap.bpf.c): tcp_read_skb hands the verdict whole skbs, including bytes delivered
 * before, so a verdict that forwards must know where each skb starts and cut what it has
 * seen already. Shared by the stream verdicts of sockmap.bpf.c and client_socket.bpf.c. Include after vmlinux.h and bpf_helpers.h.
 */
#ifndef TENDRIL_SKB_SEQ_H
#define TENDRIL_SKB_SEQ_H

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

/* The TCP sequence number of the skb's first byte. */
static __always_inline __u32 skb_seq(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	struct tcp_skb_cb *cb = (struct tcp_skb_cb *)kskb->cb;
	return cb->seq;
}

/* Where the source's reader stands: the first byte nobody has read yet. Before the first
 * verdict that is what the proxy read in userspace before the socket joined. */
static __always_inline __u32 first_seq(struct __sk_buff *skb, __u32 seq)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return seq;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	return tp ? tp->copied_seq : seq;
}

/* Cuts `n` bytes off the head of the skb: the helper pulls them into the linear part and
 * drops them, at most 4095 per call. Up to 64 calls (256 KiB, more than any skb here). */
#define TRIM_STEP 4095
#define TRIM_CALLS 64
static __always_inline int trim_head(struct __sk_buff *skb, __u32 n)
{
	for (int i = 0; i < TRIM_CALLS && n > 0; i++) {
		__u32 step = n > TRIM_STEP ? TRIM_STEP : n;
		if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0))
			return -1;
		n -= step;
	}
	return n ? -1 : 0;
}

#define SKB_NEW 0    /* nothing seen before, or the repeated head was cut off */
#define SKB_SEEN 1   /* every byte was seen before: drop the skb */
#define SKB_UNCUT -1 /* the repeated head could not be cut: the direction cannot go on */

/* Follows the source's sequence in *next_seq (set from the socket at the first skb, *known
 * then 1) and cuts bytes seen before off the skb's head; *cut says how many. Returns SKB_*;
 * *next_seq moves past the skb only on SKB_NEW. */
static __always_inline int skip_seen(struct __sk_buff *skb, __u32 *next_seq, __u32 *known,
				     __u32 *cut)
{
	__u32 len = skb->len;
	__u32 seq = skb_seq(skb);
	*cut = 0;
	if (!*known) {
		*next_seq = first_seq(skb, seq);
		*known = 1;
	}
	__s32 behind = (__s32)(*next_seq - seq);
	if (behind > 0) {
		if ((__u32)behind >= len)
			return SKB_SEEN;
		if (trim_head(skb, behind) < 0)
			return SKB_UNCUT;
		*cut = behind;
	}
	*next_seq = seq + len;
	return SKB_NEW;
}

#endif
