/*
 * pyvmm: the few libc calls pyvmm makes through cffi (ABI mode, libc of the process).
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
int ioctl(int fd, unsigned long request, ...);
int mlock(const void *addr, size_t len);
int munlock(const void *addr, size_t len);
