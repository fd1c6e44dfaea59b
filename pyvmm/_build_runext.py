# SPDX-License-Identifier: GPL-2.0-or-later
"""Build script of `pyvmm._runext`, the compiled exit helper (cffi out-of-line API mode).

Run by setuptools at install (`cffi_modules` in setup.py); it needs a C compiler and nothing
else (no kernel headers: the few layout facts are below, checked against pyvmm's own cffi
declarations by the tests). pyvmm works without it (`pyvmm.runext` says so in one line).

`pyvmm_run(fd, page)` is one C call per exit: KVM_RUN on the vCPU fd, then the fixed fields of
the two hot exits packed into one non-negative 64-bit integer, so that Python reads them with
shifts instead of a second call into the page:

    bits 0-7   exit reason (low byte)           bit 8   1: the fields below are valid
    KVM_EXIT_IO:   bits 9-12 size, bit 13 OUT, bits 16-31 port, bits 32-44 count,
                   bits 45-61 data_offset
    KVM_EXIT_MMIO: bits 9-12 len (at most 8), bit 13 write, bits 16-62 phys_addr

Anything else (another exit, fields too wide to pack) comes back with bit 8 clear and Python
decodes the page itself. A failed KVM_RUN returns -errno, so the errno is never lost to
another call.
"""

from cffi import FFI

CDEF = "long long pyvmm_run(int fd, void *page);"

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define PYVMM_KVM_RUN 0xAE80u           /* _IO(KVMIO, 0x80) */
#define RUN_EXIT_REASON 8               /* offsetof(struct kvm_run, exit_reason) */
#define RUN_UNION 32                    /* offsetof(struct kvm_run, io) == mmio */
#define FAST 0x100ll

long long pyvmm_run(int fd, void *page)
{
	const unsigned char *run = page;
	uint32_t reason;

	if (ioctl(fd, PYVMM_KVM_RUN, 0) < 0)
		return -(long long)errno;
	memcpy(&reason, run + RUN_EXIT_REASON, 4);
	if (reason == 2) {              /* KVM_EXIT_IO */
		uint8_t direction = run[RUN_UNION], size = run[RUN_UNION + 1];
		uint16_t port;
		uint32_t count;
		uint64_t offset;

		memcpy(&port, run + RUN_UNION + 2, 2);
		memcpy(&count, run + RUN_UNION + 4, 4);
		memcpy(&offset, run + RUN_UNION + 8, 8);
		if (size > 15 || direction > 1 || count >= (1u << 13) || offset >= (1u << 17))
			return reason;
		return 2 | FAST | (long long)size << 9 | (long long)direction << 13 |
		       (long long)port << 16 | (long long)count << 32 | (long long)offset << 45;
	}
	if (reason == 6) {              /* KVM_EXIT_MMIO */
		uint64_t addr;
		uint32_t len;
		uint8_t is_write = run[RUN_UNION + 20];

		memcpy(&addr, run + RUN_UNION, 8);
		memcpy(&len, run + RUN_UNION + 16, 4);
		if (len > 8)
			len = 8;            /* kvm_run.mmio.data holds 8 bytes */
		if (addr >= (1ull << 47) || is_write > 1)
			return reason;
		return 6 | FAST | (long long)len << 9 | (long long)is_write << 13 |
		       (long long)addr << 16;
	}
	return reason & 0xff;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pyvmm._runext", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
