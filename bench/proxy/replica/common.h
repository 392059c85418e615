// SPDX-License-Identifier: GPL-2.0
/* What the benchmark stand-in (replica.c) uses: loopback addresses, and a listening socket
 * registered with a new epoll instance. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	return a;
}

/* Listens on 127.0.0.1:port; returns the socket and sets *ep to an epoll instance that
 * watches it, or returns -1 after printing why. */
static int listen_with_epoll(int port, int *ep)
{
	struct sockaddr_in at = loopback(port);
	int one = 1;
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&at, sizeof(at)) || listen(ls, 1024)) {
		perror("listen");
		return -1;
	}
	*ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event lev = { .events = EPOLLIN, .data.fd = ls };
	epoll_ctl(*ep, EPOLL_CTL_ADD, ls, &lev);
	return ls;
}

/* Accepts a client (its address in *from when not NULL) and connects a new blocking socket
 * to PostgreSQL at *pg for it, with TCP_NODELAY. Returns the client's descriptor and sets
 * *server, or returns -1 with nothing left open. Descriptors must stay below max_fd. */
static int accept_and_connect(int ls, const struct sockaddr_in *pg, struct sockaddr_in *from,
			      int max_fd, int *server)
{
	socklen_t from_len = sizeof(*from);
	int c = accept4(ls, (struct sockaddr *)from, from ? &from_len : NULL, SOCK_CLOEXEC);
	if (c < 0)
		return -1;
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c >= max_fd || s < 0 || s >= max_fd ||
	    connect(s, (const struct sockaddr *)pg, sizeof(*pg))) {
		close(c);
		if (s >= 0)
			close(s);
		return -1;
	}
	int one = 1;
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	*server = s;
	return c;
}
