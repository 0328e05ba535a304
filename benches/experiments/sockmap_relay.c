// A measurement prototype, not part of raftlb: an L4 relay whose bytes never
// reach user space. Both sockets of a proxied connection go into a BPF sockhash
// keyed by the *peer* socket's cookie, and an sk_skb verdict program (eleven
// instructions, below) redirects every arriving skb to the egress of the other
// socket. Built and run by hand to answer one question for issue 20: would a
// kernel-resident relay beat HAProxy on peer-compare's rps load?
// docs/PERFORMANCE.md (third session) has the answer (no: the redirect runs in a kworker).
//   gcc -O2 -o /tmp/sockmap_relay benches/experiments/sockmap_relay.c
//   /tmp/sockmap_relay LISTEN_PORT BACKEND_PORT   (loopback, root)
// It closes both sockets on the first hang-up, so it is only right for
// keep-alive loads: a FIN can overtake bytes still queued for the kworker.
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
static int bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof *a); }
#define INS(c,d,s,o,i) ((struct bpf_insn){c,d,s,o,i})
int main(int argc, char **argv) {
  int lport = atoi(argv[1]), bport = atoi(argv[2]);
  union bpf_attr a; memset(&a,0,sizeof a);
  a.map_type=BPF_MAP_TYPE_SOCKHASH; a.key_size=8; a.value_size=8; a.max_entries=65536;
  int map = bpf(BPF_MAP_CREATE,&a); if (map<0){perror("map");return 1;}
  struct bpf_insn p[] = {
    INS(BPF_ALU64|BPF_MOV|BPF_X, 6, 1, 0, 0),
    INS(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),
    INS(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -8, 0),
    INS(BPF_ALU64|BPF_MOV|BPF_X, 1, 6, 0, 0),
    INS(BPF_LD|BPF_DW|BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map), INS(0,0,0,0,0),
    INS(BPF_ALU64|BPF_MOV|BPF_X, 3, 10, 0, 0),
    INS(BPF_ALU64|BPF_ADD|BPF_K, 3, 0, 0, -8),
    INS(BPF_ALU64|BPF_MOV|BPF_K, 4, 0, 0, 0),
    INS(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
    INS(BPF_JMP|BPF_JNE|BPF_K, 0, 0, 1, 0),
    INS(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 1),
    INS(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[65536];
  memset(&a,0,sizeof a); a.prog_type=BPF_PROG_TYPE_SK_SKB; a.insns=(long)p; a.insn_cnt=sizeof p/sizeof p[0];
  a.license=(long)"GPL"; a.log_buf=(long)log; a.log_size=sizeof log; a.log_level=1; a.expected_attach_type=BPF_SK_SKB_VERDICT;
  int prog = bpf(BPF_PROG_LOAD,&a); if (prog<0){perror("prog"); fprintf(stderr,"%s\n",log); return 1;}
  memset(&a,0,sizeof a); a.target_fd=map; a.attach_bpf_fd=prog; a.attach_type=BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH,&a)<0){perror("attach");return 1;}
  int l = socket(AF_INET, SOCK_STREAM, 0); int one=1; setsockopt(l,SOL_SOCKET,SO_REUSEADDR,&one,4);
  struct sockaddr_in sa={.sin_family=AF_INET,.sin_port=htons(lport),.sin_addr.s_addr=htonl(0x7f000001)};
  if (bind(l,(void*)&sa,sizeof sa)||listen(l,4096)){perror("listen");return 1;}
  int ep=epoll_create1(0); struct epoll_event ev={.events=EPOLLIN,.data.u64=(unsigned long)-1}; epoll_ctl(ep,EPOLL_CTL_ADD,l,&ev);
  static int peer[1<<20];
  struct epoll_event evs[256];
  for(;;){ int n=epoll_wait(ep,evs,256,-1);
    for(int i=0;i<n;i++){ long fd=(long)evs[i].data.u64;
      if (fd==-1){ int c=accept4(l,0,0,0); if(c<0) continue;
        int b=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in ba=sa; ba.sin_port=htons(bport);
        setsockopt(c,IPPROTO_TCP,TCP_NODELAY,&one,4); setsockopt(b,IPPROTO_TCP,TCP_NODELAY,&one,4);
        if(connect(b,(void*)&ba,sizeof ba)){close(c);close(b);continue;}
        unsigned long kc,kb; socklen_t sl=8; getsockopt(c,SOL_SOCKET,SO_COOKIE,&kc,&sl); getsockopt(b,SOL_SOCKET,SO_COOKIE,&kb,&sl);
        unsigned long vb=b, vc=c;
        memset(&a,0,sizeof a); a.map_fd=map; a.key=(long)&kc; a.value=(long)&vb; a.flags=BPF_ANY; if(bpf(BPF_MAP_UPDATE_ELEM,&a)) perror("upd1");
        memset(&a,0,sizeof a); a.map_fd=map; a.key=(long)&kb; a.value=(long)&vc; a.flags=BPF_ANY; if(bpf(BPF_MAP_UPDATE_ELEM,&a)) perror("upd2");
        peer[c]=b; peer[b]=c;
        struct epoll_event e1={.events=EPOLLRDHUP,.data.u64=c}, e2={.events=EPOLLRDHUP,.data.u64=b};
        epoll_ctl(ep,EPOLL_CTL_ADD,c,&e1); epoll_ctl(ep,EPOLL_CTL_ADD,b,&e2);
      } else { if (evs[i].events & (EPOLLRDHUP|EPOLLHUP|EPOLLERR)) { int o=peer[fd]; close(fd); close(o); } }
    }
  }
}
