// A kernel that occupies the stream for a given time: stands in for a layer's
// compute in benchmarks of transfer/compute overlap.
#include <cstdint>

extern "C" __global__ void spin_ns(uint64_t ns) {
    uint64_t start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    for (;;) {
        uint64_t now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start >= ns) break;
        __nanosleep(1000);
    }
}
