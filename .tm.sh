t() { s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) : $*"; }
grep -o -w -E 'avx|avx2|avx512f|svm|npt|sse4_2|nrip_save' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
t python -c pass
t python -c "sum(range(10**6))"
t python -c "import pytest"
