// A measurement prototype, not part of raftlb: the least a user-space L4 relay can do
// per request, to bound what any proxy could reach on peer-compare's rps and cps loads.
// One thread, one epoll set, level-triggered; per readable socket one recv and one
// send to its peer; TCP_NODELAY; a FIN is passed on with shutdown(SHUT_WR); both
// sockets close once both directions have ended. No timers, limits, health, metrics or
// logs. A send that would block closes the pair (counted): fine for small requests,
// wrong for bulk. docs/PERFORMANCE.md (eleventh session) has what it measured.
//   gcc -O2 -o /tmp/min_relay benches/experiments/min_relay.c
//   /tmp/min_relay LISTEN_PORT BACKEND_PORT   (loopback only)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { MAXFD = 65536 };
static int peer[MAXFD];
static char ended[MAXFD];  // this socket's read side reached EOF and was passed on
static long dropped;

static void close_pair(int ep, int fd) {
  int p = peer[fd];
  epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
  epoll_ctl(ep, EPOLL_CTL_DEL, p, NULL);
  close(fd);
  close(p);
  ended[fd] = ended[p] = 0;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT\n", argv[0]); return 2; }
  struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  struct sockaddr_in ba = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  inet_pton(AF_INET, "127.0.0.1", &la.sin_addr);
  inet_pton(AF_INET, "127.0.0.1", &ba.sin_addr);
  int one = 1;
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(ls, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // inherited by accepted sockets
  if (bind(ls, (void *)&la, sizeof la) || listen(ls, 4096)) { perror("listen"); return 1; }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  struct epoll_event evs[256];
  static char buf[16384];
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == ls) {
        for (;;) {
          int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
          if (c < 0) break;
          int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
          setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          if (b < 0 || b >= MAXFD || c >= MAXFD ||
              (connect(b, (void *)&ba, sizeof ba) && errno != EINPROGRESS)) {
            close(c); if (b >= 0) close(b); dropped++; continue;
          }
          peer[c] = b; peer[b] = c;
          ev.events = EPOLLIN | EPOLLRDHUP; ev.data.fd = c; epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
          ev.data.fd = b; epoll_ctl(ep, EPOLL_CTL_ADD, b, &ev);
        }
        continue;
      }
      if (peer[fd] < 0) continue;  // closed earlier in this batch
      ssize_t r = recv(fd, buf, sizeof buf, 0);
      if (r > 0) {
        if (send(peer[fd], buf, r, MSG_NOSIGNAL) != r) { dropped++; int p = peer[fd]; close_pair(ep, fd); peer[fd] = peer[p] = -1; }
        continue;
      }
      if (r < 0 && errno == EAGAIN) continue;
      if (r < 0 || ended[peer[fd]]) { int p = peer[fd]; close_pair(ep, fd); peer[fd] = peer[p] = -1; continue; }
      ended[fd] = 1;  // EOF: pass the FIN on, stop watching this side
      shutdown(peer[fd], SHUT_WR);
      epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    }
    if (dropped && (dropped & 1023) == 1) fprintf(stderr, "dropped %ld pairs\n", dropped);
  }
}
