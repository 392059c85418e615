// SPDX-License-Identifier: GPL-2.0
/*
 * A benchmark stand-in for issue 8, not product code: measures forwarding on the client's
 * own socket (msg.bpf.c) beside tendril's kernel path and the probe's replica (replica.c).
 * One epoll thread: attach the sockops program to the cgroup v2 root through a link (gone
 * when this process exits), accept, blocking connect to PostgreSQL, then the server socket
 * joins `servers` and the routes are written; bytes the client sent before that (its
 * startup packet), and what the client sends while the server is backed up, are read and
 * written here with blocking writes, and counted in `forwarded`; replies the verdict passed
 * up during a receive-side pause are copied to the accepted socket once the ring buffer
 * says the client drained, within the verdict's allowance, and counted in `recv_written`
 * (see msg.bpf.c). Only for clients on this host; no fencing; on a hang-up it waits 2 ms
 * for the backlog before the half-close.
 *
 * usage: msg LISTEN_PORT PG_PORT OBJECT CGROUP2_DIR
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#define MAX_FD 65536

static int peer[MAX_FD];
static char hung_up[MAX_FD];
static uint32_t client_port[MAX_FD], server_port[MAX_FD];
static uint64_t forwarded_total[MAX_FD];
static uint64_t written_total[MAX_FD];
static int by_server_port[65536];
static int recv_written_fd, epfd;

struct recv_state {
	uint64_t timer[2];
	uint32_t client, mode;
	uint64_t passed;
	uint32_t server, pauses;
	uint32_t next_seq, seq_known;
	uint64_t allow, unchecked;
};

static int recv_states_fd;
/* Replies read beyond the allowance, written after the next drained event. */
static char *held[MAX_FD];
static size_t held_len[MAX_FD];

/* Accepted sockets are blocking (accept4 without SOCK_NONBLOCK): the client's window holds
 * the proxy here. */
static int write_all(int c, const char *b, size_t n)
{
	size_t off = 0;
	while (off < n) {
		ssize_t w = send(c, b + off, n - off, MSG_NOSIGNAL);
		if (w <= 0)
			return -1;
		off += w;
	}
	return 0;
}

/* Copies what the verdict passed up on server socket s to the client's accepted socket,
 * but only as far as the verdict allows: bytes passed after a pause wait (held here, the
 * socket no longer polled for input) until the client's backlog has drained. */
static void copy_replies(int s)
{
	static char rbuf[65536];
	struct recv_state st;
	if (held_len[s]) {
		if (bpf_map_lookup_elem(recv_states_fd, &server_port[s], &st) ||
		    written_total[s] + held_len[s] > st.allow)
			return;
		write_all(peer[s], held[s], held_len[s]);
		written_total[s] += held_len[s];
		held_len[s] = 0;
		bpf_map_update_elem(recv_written_fd, &server_port[s], &written_total[s], BPF_ANY);
	}
	ssize_t r;
	while ((r = recv(s, rbuf, sizeof(rbuf), MSG_DONTWAIT)) > 0) {
		/* Read the allowance after the bytes are in hand: a pause lowers it before the
		 * bytes it holds back are queued. */
		if (bpf_map_lookup_elem(recv_states_fd, &server_port[s], &st) ||
		    written_total[s] + r > st.allow) {
			if (!held[s])
				held[s] = malloc(65536);
			memcpy(held[s], rbuf, r);
			held_len[s] = r;
			struct epoll_event es = { .events = EPOLLRDHUP, .data.fd = s };
			epoll_ctl(epfd, EPOLL_CTL_MOD, s, &es);
			return;
		}
		write_all(peer[s], rbuf, r);
		written_total[s] += r;
		bpf_map_update_elem(recv_written_fd, &server_port[s], &written_total[s], BPF_ANY);
	}
}

static int on_drained(void *ctx, void *data, size_t size)
{
	uint32_t sp = *(uint32_t *)data;
	int s = by_server_port[sp];
	if (s <= 0)
		return 0;
	struct epoll_event es = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = s };
	epoll_ctl(epfd, EPOLL_CTL_MOD, s, &es);
	copy_replies(s);
	return 0;
}

static int map_fd(struct bpf_object *obj, const char *name)
{
	return bpf_object__find_map_fd_by_name(obj, name);
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s LISTEN_PORT PG_PORT OBJECT CGROUP2_DIR\n", argv[0]);
		return 2;
	}
	uint32_t port = atoi(argv[1]);
	struct sockaddr_in pg = loopback(atoi(argv[2]));
	struct bpf_object *obj = bpf_object__open_file(argv[3], NULL);
	struct bpf_map *rodata = obj ? bpf_object__find_map_by_name(obj, ".rodata") : NULL;
	/* msg.bpf.c's read-only globals, in order: listen_port, pg_port, limit. */
	struct { uint32_t listen, pg; uint64_t limit, recv_limit; } ro = { port, atoi(argv[2]), 1 << 20, 1 << 20 };
	if (!rodata || bpf_map__set_initial_value(rodata, &ro, sizeof(ro)) ||
	    bpf_object__load(obj)) {
		perror("load the BPF object");
		return 1;
	}
	int clients = map_fd(obj, "clients"), servers = map_fd(obj, "servers");
	int to_server = map_fd(obj, "to_server"), to_client = map_fd(obj, "to_client");
	struct bpf_program *ops = bpf_object__find_program_by_name(obj, "client_established");
	int acked = map_fd(obj, "acked"), forwarded = map_fd(obj, "forwarded");
	int sends = map_fd(obj, "sends");
	int accepted = map_fd(obj, "accepted"), recv_states = map_fd(obj, "recv_states");
	recv_states_fd = recv_states;
	recv_written_fd = map_fd(obj, "recv_written");
	int send_prog = bpf_program__fd(bpf_object__find_program_by_name(obj, "client_send"));
	int recv_prog = bpf_program__fd(bpf_object__find_program_by_name(obj, "server_receive"));
	int cgroup = open(argv[4], O_RDONLY | O_DIRECTORY);
	if (cgroup < 0 || bpf_prog_attach(send_prog, clients, BPF_SK_MSG_VERDICT, 0) ||
	    bpf_prog_attach(recv_prog, servers, BPF_SK_SKB_STREAM_VERDICT, 0) ||
	    !bpf_program__attach_cgroup(ops, cgroup)) {
		perror("attach the programs");
		return 1;
	}
	int ep;
	int ls = listen_with_epoll(atoi(argv[1]), &ep);
	if (ls < 0)
		return 1;
	epfd = ep;
	struct ring_buffer *rb = ring_buffer__new(map_fd(obj, "drained"), on_drained, NULL, NULL);
	int rbfd = ring_buffer__epoll_fd(rb);
	struct epoll_event rev = { .events = EPOLLIN, .data.fd = rbfd };
	epoll_ctl(ep, EPOLL_CTL_ADD, rbfd, &rev);
	fprintf(stderr, "msg replica listening on %s\n", argv[1]);
	static char buf[65536];
	for (;;) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				struct sockaddr_in from;
				int s, c = accept_and_connect(ls, &pg, &from, MAX_FD, &s);
				if (c < 0)
					continue;
				struct sockaddr_in me;
				socklen_t me_len = sizeof(me);
				getsockname(s, (struct sockaddr *)&me, &me_len);
				uint32_t cp = ntohs(from.sin_port), sp = ntohs(me.sin_port);
				uint64_t sfd = s, zero = 0, cfd = c;
				struct recv_state rst = { .client = cp, .server = sp };
				written_total[s] = 0;
				held_len[s] = 0;
				by_server_port[sp] = s;
				bpf_map_update_elem(recv_states, &sp, &rst, BPF_ANY);
				bpf_map_update_elem(recv_written_fd, &sp, &zero, BPF_ANY);
				bpf_map_update_elem(accepted, &cp, &cfd, BPF_ANY);
				forwarded_total[c] = 0;
				bpf_map_update_elem(acked, &sp, &zero, BPF_ANY);
				bpf_map_update_elem(forwarded, &cp, &zero, BPF_ANY);
				if (bpf_map_update_elem(servers, &sp, &sfd, BPF_ANY) ||
				    bpf_map_update_elem(to_client, &sp, &cp, BPF_ANY) ||
				    bpf_map_update_elem(to_server, &cp, &sp, BPF_ANY)) {
					perror("join");
					close(c);
					close(s);
					continue;
				}
				client_port[c] = client_port[s] = cp;
				server_port[c] = server_port[s] = sp;
				peer[c] = s;
				peer[s] = c;
				hung_up[c] = hung_up[s] = 0;
				/* The accepted socket carries only what the client sent before
				 * the routes existed, and the client's FIN. */
				struct epoll_event ec = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = c };
				struct epoll_event es = { .events = EPOLLRDHUP, .data.fd = s };
				epoll_ctl(ep, EPOLL_CTL_ADD, c, &ec);
				epoll_ctl(ep, EPOLL_CTL_ADD, s, &es);
				continue;
			}
			if (fd == rbfd) {
				ring_buffer__consume(rb);
				continue;
			}
			if ((evs[i].events & EPOLLIN) && fd == peer[peer[fd]] && by_server_port[server_port[fd]] == fd) {
				copy_replies(fd);
			} else if (evs[i].events & EPOLLIN) {
				ssize_t r;
				while ((r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
					/* A blocking write (server sockets are blocking here): the
					 * server's flow control holds the proxy, the accepted socket's
					 * window holds the client. */
					ssize_t off = 0;
					while (off < r) {
						ssize_t w = send(peer[fd], buf + off, r - off, MSG_NOSIGNAL);
						if (w <= 0)
							break;
						off += w;
					}
					forwarded_total[fd] += off;
					bpf_map_update_elem(forwarded, &client_port[fd], &forwarded_total[fd], BPF_ANY);
				}
			}
			if ((evs[i].events & (EPOLLRDHUP | EPOLLHUP)) && !hung_up[fd]) {
				int p = peer[fd];
				hung_up[fd] = 1;
				usleep(2000);
				shutdown(p, SHUT_WR);
				if (hung_up[p]) {
					epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
					epoll_ctl(ep, EPOLL_CTL_DEL, p, NULL);
					bpf_map_delete_elem(to_server, &client_port[fd]);
					bpf_map_delete_elem(to_client, &server_port[fd]);
					bpf_map_delete_elem(acked, &server_port[fd]);
					bpf_map_delete_elem(forwarded, &client_port[fd]);
					bpf_map_delete_elem(sends, &client_port[fd]);
					bpf_map_delete_elem(recv_states_fd, &server_port[fd]);
					bpf_map_delete_elem(recv_written_fd, &server_port[fd]);
					by_server_port[server_port[fd]] = 0;
					close(fd);
					close(p);
				}
			}
		}
	}
}
