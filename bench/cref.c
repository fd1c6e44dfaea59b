// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * cref - the C reference of pyvmm's benchmarks: the same guest payloads, driven through the same
 * KVM paths by a bare KVM_RUN loop, so a pyperf benchmark can compare pyvmm with the limit.
 *
 * Usage: cref MODE STATEFILE
 *
 * STATEFILE is written by bench/benchlib.py from a VM that pyvmm set up (see write_state()):
 * the memory pieces pyvmm writes (system area and payload image), the vCPU's sregs and regs as
 * KVM_GET_SREGS/KVM_GET_REGS returned them, and which range to restore before each run. So the
 * guest starts here in exactly the state it starts in under pyvmm.
 *
 * The program then serves commands, one per line on stdin: a count N. It runs the guest with
 * RCX = N (the payloads' ring/round count) and answers one line "NS RINGS EXITS": the
 * nanoseconds the run took (CLOCK_MONOTONIC, from the first KVM_RUN to the guest's DONE), the
 * rings the C device counted, and the userspace exits seen, then "USER SYS": the process's user
 * and system CPU time over the same region (getrusage, nanoseconds). For MODE spawn, N micro-VMs are
 * created, run to their end and closed, and RINGS counts those that finished with status 0.
 * An empty line or EOF ends the program.
 *
 * Modes:
 *   exit-pio, exit-mmio       userspace exits; a counter device in this loop counts the rings
 *   ioevent-pio, ioevent-mmio an ioeventfd doorbell (width R10); the eventfd counts the rings
 *   pingpong                  in-kernel irqchip; an ioeventfd doorbell (PIO R8, 1 byte) served
 *                             by a device thread (epoll) that answers on an irqfd (GSI R9)
 *   spawn                     create VM, memslot, vCPU, load, run to DONE, close; N times
 *
 * The guest's ucall ports are served as pyvmm's Machine serves them: a REPORT (0xEA) captures
 * the registers (KVM_GET_REGS), DONE (0xEB) ends the run, FAIL/FAULT (0xEC/0xED) are errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define PORT_CONSOLE 0xE9
#define PORT_REPORT 0xEA
#define PORT_DONE 0xEB
#define PORT_FAIL 0xEC
#define PORT_FAULT 0xED

#define STATE_MAGIC "PYVMMST1"
#define STATE_IRQCHIP 1u

struct segment {
	uint64_t gpa, len;
	unsigned char *data;
};

struct state {
	uint32_t flags, nseg;
	uint64_t mem_size, reload_gpa, reload_len;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct segment *seg;
};

struct vm {
	int fd, vcpu, run_size;
	unsigned char *mem;
	struct kvm_run *run;
	int bell, irq;          /* ioeventfd, irqfd (pingpong) */
};

static int kvm_fd;
static struct kvm_cpuid2 *cpuid;
static struct state st;

static void die(const char *what)
{
	fprintf(stderr, "cref: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void fail(const char *what)
{
	fprintf(stderr, "cref: %s\n", what);
	exit(3);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t tv_ns(struct timeval tv)
{
	return (uint64_t)tv.tv_sec * 1000000000u + (uint64_t)tv.tv_usec * 1000u;
}

/* User and system CPU time of this process so far, in nanoseconds. */
static void cpu_ns(uint64_t *user, uint64_t *sys)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) < 0)
		die("getrusage");
	*user = tv_ns(ru.ru_utime);
	*sys = tv_ns(ru.ru_stime);
}

static void read_exact(FILE *f, void *buf, size_t len)
{
	if (fread(buf, 1, len, f) != len)
		fail("state file is truncated");
}

static void load_state(const char *path)
{
	FILE *f = fopen(path, "rb");
	char magic[8];
	uint32_t sregs_size, regs_size;

	if (!f)
		die(path);
	read_exact(f, magic, 8);
	if (memcmp(magic, STATE_MAGIC, 8))
		fail("not a pyvmm bench state file");
	read_exact(f, &st.flags, 4);
	read_exact(f, &st.nseg, 4);
	read_exact(f, &st.mem_size, 8);
	read_exact(f, &st.reload_gpa, 8);
	read_exact(f, &st.reload_len, 8);
	read_exact(f, &sregs_size, 4);
	read_exact(f, &regs_size, 4);
	if (sregs_size != sizeof(st.sregs) || regs_size != sizeof(st.regs))
		fail("kvm_sregs/kvm_regs sizes differ from pyvmm's");
	read_exact(f, &st.sregs, sizeof(st.sregs));
	read_exact(f, &st.regs, sizeof(st.regs));
	st.seg = calloc(st.nseg, sizeof(*st.seg));
	for (uint32_t i = 0; i < st.nseg; i++) {
		read_exact(f, &st.seg[i].gpa, 8);
		read_exact(f, &st.seg[i].len, 8);
		if (st.seg[i].gpa + st.seg[i].len > st.mem_size)
			fail("a memory piece lies outside guest RAM");
		st.seg[i].data = malloc(st.seg[i].len);
		read_exact(f, st.seg[i].data, st.seg[i].len);
	}
	fclose(f);
}

static void get_cpuid(void)
{
	int n = 256;
	cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(cpuid->entries[0]));
	cpuid->nent = n;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
}

static void vm_create(struct vm *v)
{
	struct kvm_userspace_memory_region region = {0};

	v->bell = v->irq = -1;
	v->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (v->fd < 0)
		die("KVM_CREATE_VM");
	if ((st.flags & STATE_IRQCHIP) && ioctl(v->fd, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	v->mem = mmap(NULL, st.mem_size, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (v->mem == MAP_FAILED)
		die("mmap guest memory");
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = st.mem_size;
	region.userspace_addr = (uintptr_t)v->mem;
	if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	for (uint32_t i = 0; i < st.nseg; i++)
		memcpy(v->mem + st.seg[i].gpa, st.seg[i].data, st.seg[i].len);
	v->vcpu = ioctl(v->fd, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die("KVM_CREATE_VCPU");
	v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(v->vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
}

static void vm_destroy(struct vm *v)
{
	munmap(v->run, v->run_size);
	close(v->vcpu);
	close(v->fd);
	munmap(v->mem, st.mem_size);
}

/* Restore the image (its .data may have changed) and the vCPU state, with RCX = count. */
static void vm_reset(struct vm *v, uint64_t count, int reload)
{
	struct kvm_regs regs = st.regs;

	/* KVM finishes the last exit's OUT (moving RIP past it) on the next KVM_RUN; run once
	 * with immediate_exit so that it does, before the registers are replaced. */
	v->run->immediate_exit = 1;
	if (ioctl(v->vcpu, KVM_RUN, 0) == 0 || errno != EINTR)
		die("KVM_RUN with immediate_exit");
	v->run->immediate_exit = 0;

	if (reload) {
		for (uint32_t i = 0; i < st.nseg; i++)
			if (st.seg[i].gpa == st.reload_gpa)
				memcpy(v->mem + st.seg[i].gpa, st.seg[i].data, st.seg[i].len);
	}
	if (ioctl(v->vcpu, KVM_SET_SREGS, &st.sregs) < 0)
		die("KVM_SET_SREGS");
	regs.rcx = count;
	if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

/*
 * Run to the guest's DONE. With count_port / count_addr set, that port / address is a counter
 * device (a userspace doorbell): each write is one ring. Returns the DONE status.
 */
static uint32_t vm_run(struct vm *v, int count_port, uint64_t count_addr, uint64_t *rings,
		       uint64_t *exits)
{
	struct kvm_run *run = v->run;
	unsigned char last[8];

	for (;;) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		(*exits)++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			unsigned char *data = (unsigned char *)run + run->io.data_offset;
			int port = run->io.port;

			if (port == count_port && run->io.direction == KVM_EXIT_IO_OUT) {
				/* the counter device: one ring per element */
				for (uint32_t i = 0; i < run->io.count; i++) {
					memcpy(last, data + i * run->io.size, run->io.size);
					(*rings)++;
				}
			} else if (port == PORT_REPORT) {
				struct kvm_regs regs;
				if (ioctl(v->vcpu, KVM_GET_REGS, &regs) < 0)
					die("KVM_GET_REGS");
			} else if (port == PORT_DONE) {
				uint32_t status = 0;
				memcpy(&status, data, run->io.size < 4 ? run->io.size : 4);
				return status;
			} else if (port == PORT_CONSOLE) {
				/* console output: dropped */
			} else if (port == PORT_FAIL || port == PORT_FAULT) {
				fprintf(stderr, "cref: guest failed (port %#x)\n", port);
				exit(4);
			} else if (run->io.direction == KVM_EXIT_IO_IN) {
				memset(data, 0xff, run->io.size * run->io.count);
			}
			break;
		}
		case KVM_EXIT_MMIO:
			if (run->mmio.is_write && count_addr && run->mmio.phys_addr == count_addr) {
				memcpy(last, run->mmio.data, run->mmio.len);
				(*rings)++;
			} else if (!run->mmio.is_write) {
				memset(run->mmio.data, 0xff, run->mmio.len);
			}
			break;
		default:
			fprintf(stderr, "cref: unexpected exit reason %u\n", run->exit_reason);
			exit(4);
		}
	}
}

/* ---- the pingpong device: an epoll thread, ioeventfd in, irqfd out ---- */

struct device {
	int epoll, bell, irq, stop;
	uint64_t rings, interrupts;
	pthread_t thread;
};

static void *device_loop(void *arg)
{
	struct device *d = arg;
	struct epoll_event ev[4];

	for (;;) {
		int n = epoll_wait(d->epoll, ev, 4, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			uint64_t k;
			if (ev[i].data.fd == d->stop)
				return NULL;
			if (read(d->bell, &k, 8) != 8) {
				if (errno == EAGAIN)
					continue;
				die("read doorbell");
			}
			__atomic_add_fetch(&d->rings, k, __ATOMIC_RELAXED);
			for (uint64_t j = 0; j < k; j++) {   /* one completion per notify */
				uint64_t one = 1;
				__atomic_add_fetch(&d->interrupts, 1, __ATOMIC_RELAXED);
				if (write(d->irq, &one, 8) != 8)
					die("write irqfd");
			}
		}
	}
}

static void device_start(struct device *d, struct vm *v)
{
	struct kvm_ioeventfd io = {0};
	struct kvm_irqfd irqfd = {0};
	struct epoll_event ev = {.events = EPOLLIN};

	d->bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	d->irq = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	d->stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	io.addr = (uint16_t)st.regs.r8;
	io.len = 1;
	io.fd = d->bell;
	io.flags = KVM_IOEVENTFD_FLAG_PIO;
	if (ioctl(v->fd, KVM_IOEVENTFD, &io) < 0)
		die("KVM_IOEVENTFD");
	irqfd.fd = d->irq;
	irqfd.gsi = (uint32_t)st.regs.r9;
	if (ioctl(v->fd, KVM_IRQFD, &irqfd) < 0)
		die("KVM_IRQFD");
	d->epoll = epoll_create1(EPOLL_CLOEXEC);
	ev.data.fd = d->bell;
	epoll_ctl(d->epoll, EPOLL_CTL_ADD, d->bell, &ev);
	ev.data.fd = d->stop;
	epoll_ctl(d->epoll, EPOLL_CTL_ADD, d->stop, &ev);
	if (pthread_create(&d->thread, NULL, device_loop, d))
		fail("pthread_create");
}

/* ---- modes ---- */

static int ioevent_open(struct vm *v, int mmio)
{
	struct kvm_ioeventfd io = {0};
	int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

	io.addr = mmio ? st.regs.r9 : (uint16_t)st.regs.r8;
	io.len = (uint32_t)st.regs.r10;
	io.fd = fd;
	io.flags = mmio ? 0 : KVM_IOEVENTFD_FLAG_PIO;
	if (ioctl(v->fd, KVM_IOEVENTFD, &io) < 0)
		die("KVM_IOEVENTFD");
	return fd;
}

static uint64_t eventfd_take(int fd)
{
	uint64_t k = 0;
	if (read(fd, &k, 8) != 8 && errno != EAGAIN)
		die("read eventfd");
	return k;
}

int main(int argc, char **argv)
{
	const char *mode;
	char line[64];
	struct vm v = {0};
	struct device dev = {0};
	int exit_pio = 0, exit_mmio = 0, ioevent = 0, pingpong = 0, spawn = 0, bell = -1;

	if (argc != 3) {
		fprintf(stderr, "usage: cref MODE STATEFILE  (then counts on stdin)\n");
		return 1;
	}
	mode = argv[1];
	exit_pio = !strcmp(mode, "exit-pio");
	exit_mmio = !strcmp(mode, "exit-mmio");
	ioevent = !strcmp(mode, "ioevent-pio") || !strcmp(mode, "ioevent-mmio");
	pingpong = !strcmp(mode, "pingpong");
	spawn = !strcmp(mode, "spawn");
	if (!(exit_pio || exit_mmio || ioevent || pingpong || spawn)) {
		fprintf(stderr, "cref: unknown mode %s\n", mode);
		return 1;
	}
	load_state(argv[2]);
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("/dev/kvm");
	v.run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	get_cpuid();
	if (pingpong && !(st.flags & STATE_IRQCHIP))
		fail("pingpong needs a state with the irqchip");

	if (!spawn) {
		vm_create(&v);
		if (ioevent)
			bell = ioevent_open(&v, !strcmp(mode, "ioevent-mmio"));
		if (pingpong)
			device_start(&dev, &v);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		uint64_t n = strtoull(line, NULL, 0), rings = 0, exits = 0, t0, t1;
		uint64_t u0, s0, u1, s1;

		if (line[0] == '\n' || line[0] == 'q')
			break;
		if (spawn) {
			struct vm s = {.run_size = v.run_size};
			cpu_ns(&u0, &s0);
			t0 = now_ns();
			for (uint64_t i = 0; i < n; i++) {
				vm_create(&s);
				vm_reset(&s, st.regs.rcx, 0);
				if (vm_run(&s, -1, 0, &rings, &exits) == 0)
					rings++;
				vm_destroy(&s);
			}
			t1 = now_ns();
			cpu_ns(&u1, &s1);
		} else {
			uint64_t before_rings = 0, before_irqs = 0;
			if (pingpong) {
				before_rings = __atomic_load_n(&dev.rings, __ATOMIC_RELAXED);
				before_irqs = __atomic_load_n(&dev.interrupts, __ATOMIC_RELAXED);
			}
			vm_reset(&v, n, 1);
			cpu_ns(&u0, &s0);
			t0 = now_ns();
			uint32_t status = vm_run(&v, exit_pio ? (int)(uint16_t)st.regs.r8 : -1,
						 exit_mmio ? st.regs.r9 : 0, &rings, &exits);
			t1 = now_ns();
			cpu_ns(&u1, &s1);
			if (status != 0)
				fail("guest finished with a nonzero status");
			if (ioevent)
				rings = eventfd_take(bell);
			if (pingpong) {
				rings = __atomic_load_n(&dev.rings, __ATOMIC_RELAXED) - before_rings;
				if (__atomic_load_n(&dev.interrupts, __ATOMIC_RELAXED) - before_irqs != rings)
					fail("pingpong: interrupts differ from notifies");
			}
		}
		printf("%llu %llu %llu %llu %llu\n", (unsigned long long)(t1 - t0),
		       (unsigned long long)rings, (unsigned long long)exits,
		       (unsigned long long)(u1 - u0), (unsigned long long)(s1 - s0));
	}
	if (pingpong) {
		uint64_t one = 1;
		if (write(dev.stop, &one, 8) != 8)
			die("stop device");
		pthread_join(dev.thread, NULL);
	}
	if (!spawn)
		vm_destroy(&v);
	return 0;
}
