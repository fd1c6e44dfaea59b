/*
 * pyvmm: the few libc calls pyvmm makes through cffi (ABI mode, libc of the process).
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
int mlock(const void *addr, size_t len);
int munlock(const void *addr, size_t len);
