// SPDX-License-Identifier: GPL-2.0
/*
 * A benchmark stand-in, not product code: the minimal sockmap proxy the feasibility probe
 * measured (../../../../shared/anchors/feasibility-sockmap.md), rebuilt so that every
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

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	return a;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s LISTEN_PORT PG_PORT OBJECT\n", argv[0]);
		return 2;
	}
	struct sockaddr_in listen_at = loopback(atoi(argv[1]));
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
	int one = 1;
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&listen_at, sizeof(listen_at)) || listen(ls, 1024)) {
		perror("listen");
		return 1;
	}
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event lev = { .events = EPOLLIN, .data.fd = ls };
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
	fprintf(stderr, "replica listening on %s\n", argv[1]);
	for (;;) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
				if (c < 0)
					continue;
				int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
				if (c >= MAX_FD || s < 0 || s >= MAX_FD ||
				    connect(s, (struct sockaddr *)&pg, sizeof(pg))) {
					close(c);
					if (s >= 0)
						close(s);
					continue;
				}
				setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
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
