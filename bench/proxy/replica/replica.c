// SPDX-License-Identifier: GPL-2.0
/*
 * A benchmark stand-in, not product code: the minimal sockmap proxy of the feasibility probe
 * that preceded tendril's kernel path (its figures: docs/benchmarks.md), rebuilt so that every
 * `cargo xtask bench proxy` run compares tendril's kernel path with the probe's design in
 * the same rounds. One epoll thread: accept, blocking connect to PostgreSQL, TCP_NODELAY,
 * both sockets into the sockhash (each under its peer's cookie), a peek to push queued
 * bytes through the verdict, then only EPOLLRDHUP. No backpressure, no fencing, no byte
 * accounting; on a hang-up it waits 2 ms for the backlog before the half-close.
 *
 * usage: replica LISTEN_PORT PG_PORT OBJECT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
#define MAX_FD 65536

static int peer[MAX_FD];
static char hung_up[MAX_FD];

static uint64_t cookie(int fd)
{
	uint64_t c = 0;
	socklen_t len = sizeof(c);
	getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &len);
	return c;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s LISTEN_PORT PG_PORT OBJECT\n", argv[0]);
		return 2;
	}
	struct sockaddr_in pg = loopback(atoi(argv[2]));
	struct bpf_object *obj = bpf_object__open_file(argv[3], NULL);
	if (!obj || bpf_object__load(obj)) {
		perror("load the BPF object");
		return 1;
	}
	int map = bpf_object__find_map_fd_by_name(obj, "peers");
	int prog = bpf_program__fd(bpf_object__find_program_by_name(obj, "forward"));
	if (map < 0 || prog < 0 || bpf_prog_attach(prog, map, BPF_SK_SKB_STREAM_VERDICT, 0)) {
		perror("attach the verdict");
		return 1;
	}
	int one = 1, ep;
	int ls = listen_with_epoll(atoi(argv[1]), &ep);
	if (ls < 0)
		return 1;
	fprintf(stderr, "replica listening on %s\n", argv[1]);
	for (;;) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				int s, c = accept_and_connect(ls, &pg, NULL, MAX_FD, &s);
				if (c < 0)
					continue;
				setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				uint64_t kc = cookie(c), ks = cookie(s), vc = c, vs = s;
				bpf_map_update_elem(map, &kc, &vs, BPF_ANY);
				bpf_map_update_elem(map, &ks, &vc, BPF_ANY);
				char b;
				recv(c, &b, 1, MSG_DONTWAIT | MSG_PEEK);
				recv(s, &b, 1, MSG_DONTWAIT | MSG_PEEK);
				peer[c] = s;
				peer[s] = c;
				hung_up[c] = hung_up[s] = 0;
				struct epoll_event ec = { .events = EPOLLRDHUP, .data.fd = c };
				struct epoll_event es = { .events = EPOLLRDHUP, .data.fd = s };
				epoll_ctl(ep, EPOLL_CTL_ADD, c, &ec);
				epoll_ctl(ep, EPOLL_CTL_ADD, s, &es);
			} else if (!hung_up[fd]) {
				int p = peer[fd];
				hung_up[fd] = 1;
				usleep(2000);
				shutdown(p, SHUT_WR);
				if (hung_up[p]) {
					epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
					epoll_ctl(ep, EPOLL_CTL_DEL, p, NULL);
					close(fd);
					close(p);
				}
			}
		}
	}
}
