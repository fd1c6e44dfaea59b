// SPDX-License-Identifier: GPL-2.0-or-later
// Does userspace work between two KVM_RUNs slow the kernel's side of an exit? A real-mode
// guest loops on IN from port 0x80 (a userspace PIO exit, as vmexit.flat's inl_from_qemu);
// between exits this loop reads N KiB of its own memory (64-byte stride), standing in for the
// memory an interpreter touches to serve an exit. It prints the wall time per exit and the
// part of it spent inside KVM_RUN, per N, three rounds interleaved.
//   gcc -O2 -o exit_cache bench/exit_cache.c && ./exit_cache [EXITS]
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int n=argc>1?atoi(argv[1]):100000;
  int kvm=open("/dev/kvm",O_RDWR),vm=ioctl(kvm,KVM_CREATE_VM,0);
  unsigned char*mem=mmap(0,0x10000,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS,-1,0);
  unsigned char code[]={0xe4,0x80,0xeb,0xfc}; // in al,0x80; jmp -4
  memcpy(mem+0x1000,code,sizeof code);
  struct kvm_userspace_memory_region r={0,0,0,0x10000,(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  int vc=ioctl(vm,KVM_CREATE_VCPU,0);
  int sz=ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0);
  struct kvm_run*run=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_SHARED,vc,0);
  struct kvm_sregs s;ioctl(vc,KVM_GET_SREGS,&s);s.cs.base=0;s.cs.selector=0;ioctl(vc,KVM_SET_SREGS,&s);
  struct kvm_regs g;memset(&g,0,sizeof g);g.rip=0x1000;g.rflags=2;ioctl(vc,KVM_SET_REGS,&g);
  size_t sizes[]={0,16<<10,64<<10,256<<10,1<<20,4<<20};
  int ns=sizeof sizes/sizeof*sizes;
  unsigned char*buf=malloc(4<<20);memset(buf,1,4<<20);
  volatile unsigned sink=0;
  double tot[6]={0},kin[6]={0};
  for(int round=0;round<3;round++)
  for(int k=0;k<ns;k++){
    double t0=now();
    for(int i=0;i<n;i++){
      double a=now();
      if(ioctl(vc,KVM_RUN,0)<0){perror("run");return 1;}
      kin[k]+=now()-a;
      if(run->exit_reason!=KVM_EXIT_IO){fprintf(stderr,"exit %d\n",run->exit_reason);return 1;}
      ((unsigned char*)run)[run->io.data_offset]=0xff;
      for(size_t o=0;o<sizes[k];o+=64) sink+=buf[o];
    }
    tot[k]+=now()-t0;
  }
  for(int k=0;k<ns;k++) printf("touch %5zu KiB: %.2f us/exit, %.2f us inside KVM_RUN\n",sizes[k]>>10,tot[k]/(3.0*n)*1e6,kin[k]/(3.0*n)*1e6);
  return 0;
}
