# SPDX-License-Identifier: GPL-2.0-or-later
"""Build script of `pyvmm._runext`, the compiled exit helper (cffi out-of-line API mode).

Run by setuptools at install (`cffi_modules` in setup.py); it needs a C compiler and nothing
else (no kernel headers: the few layout facts are below, checked against pyvmm's own cffi
declarations by the tests). pyvmm works without it (`pyvmm.runext` says so in one line).

`pyvmm_run(fd, page)` is one C call per exit: KVM_RUN on the vCPU fd, then the fixed fields of
the two hot exits packed into one small non-negative integer (small: Python's arithmetic on an
int of one 30-bit digit is the cheapest there is), so Python builds the exit from it without
reading the page:

    bits 0-2   1: a single PIO access (count 1, data at the usual page offset 4096)
               2: an MMIO access; 0: anything else (Python decodes the page itself)
    bit 3      OUT / MMIO write
    bits 4-7   size (PIO) / len (MMIO, at most 8)
    bits 8-23  port (PIO); bits 8-62: phys_addr (MMIO, below 2**55)

A failed KVM_RUN returns -errno, so the errno is never lost to another call. `page` is the
kvm_run mapping's address as an integer (cffi converts an int argument in a few instructions,
a pointer cdata through its generic argument conversion); the caller keeps the mapping alive
(`Vcpu.run()` holds the vCPU, and close() waits for it, while the call runs).
"""

from cffi import FFI

CDEF = "long long pyvmm_run(int fd, uintptr_t page);"

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define PYVMM_KVM_RUN 0xAE80u           /* _IO(KVMIO, 0x80) */
#define RUN_EXIT_REASON 8               /* offsetof(struct kvm_run, exit_reason) */
#define RUN_UNION 32                    /* offsetof(struct kvm_run, io) == mmio */
#define PIO_DATA_OFFSET 4096u           /* KVM_PIO_PAGE_OFFSET * 4096 on x86 */

long long pyvmm_run(int fd, uintptr_t page)
{
	const unsigned char *run = (const unsigned char *)page;
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
		if (count != 1 || offset != PIO_DATA_OFFSET || size > 15 || direction > 1)
			return 0;
		return 1 | (long long)direction << 3 | (long long)size << 4 | (long long)port << 8;
	}
	if (reason == 6) {              /* KVM_EXIT_MMIO */
		uint64_t addr;
		uint32_t len;
		uint8_t is_write = run[RUN_UNION + 20];

		memcpy(&addr, run + RUN_UNION, 8);
		memcpy(&len, run + RUN_UNION + 16, 4);
		if (len > 8)
			len = 8;            /* kvm_run.mmio.data holds 8 bytes */
		if (addr >= (1ull << 55) || is_write > 1)
			return 0;
		return 2 | (long long)is_write << 3 | (long long)len << 4 | (long long)addr << 8;
	}
	return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pyvmm._runext", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
