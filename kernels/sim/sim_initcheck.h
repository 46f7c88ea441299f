// initcheck for shared memory: a shadow byte per byte of a block's dynamic shared memory, set
// when a thread writes it and checked when a thread reads it, so that a read of never-written
// shared memory (or a read past its end) stops the launch with the kernel's name. Kernels opt in
// by declaring their shared memory with LK_CHECKED_SMEM and their pointers into it as
// lk::smem_ptr<T> (kernels/lk_common.cuh); under nvcc those are plain `T*`, here the checked
// pointer below, whose element references check on conversion and mark on assignment.
#pragma once

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace lksim {

void fault(const char* msg);

inline thread_local std::vector<unsigned char> t_shadow;
inline thread_local unsigned char* t_shadow_base = nullptr;  // the block's dynamic shared memory
inline thread_local size_t t_shadow_len = 0;

// Called by the block scheduler before every block: nothing written yet.
inline void initcheck_block_begin(unsigned char* smem, size_t bytes) {
    t_shadow.assign(bytes, 0);
    t_shadow_base = smem;
    t_shadow_len = bytes;
}

inline void smem_report(const char* what, size_t off, size_t n) {
    std::string m = std::string(what) + " (bytes " + std::to_string(off) + ".." +
                    std::to_string(off + n) + " of " + std::to_string(t_shadow_len) + ")";
    fault(m.c_str());
}

inline void smem_mark(const void* p, size_t n) {
    const size_t off = (size_t)(static_cast<const unsigned char*>(p) - t_shadow_base);
    if (off > t_shadow_len || n > t_shadow_len - off) {
        smem_report("shared-memory write outside the dynamic shared memory", off, n);
        return;
    }
    std::memset(t_shadow.data() + off, 1, n);
}

inline void smem_check(const void* p, size_t n) {
    const size_t off = (size_t)(static_cast<const unsigned char*>(p) - t_shadow_base);
    if (off > t_shadow_len || n > t_shadow_len - off) {
        smem_report("shared-memory read outside the dynamic shared memory", off, n);
        return;
    }
    for (size_t i = 0; i < n; ++i)
        if (!t_shadow[off + i]) {
            smem_report("read of never-written shared memory", off, n);
            return;
        }
}

template <typename T>
struct SmemRef {
    T* p;
    using V = std::remove_const_t<T>;
    operator V() const {
        smem_check(p, sizeof(T));
        return *p;
    }
    template <typename U>
    SmemRef& operator=(U v) {
        static_assert(!std::is_const_v<T>, "write through a pointer to const shared memory");
        smem_mark(p, sizeof(T));
        *p = static_cast<V>(v);
        return *this;
    }
    SmemRef& operator=(const SmemRef& o) { return *this = static_cast<V>(o); }
    template <typename U>
    SmemRef& operator+=(U v) {
        return *this = static_cast<V>(*this) + v;
    }
    template <typename U>
    SmemRef& operator-=(U v) {
        return *this = static_cast<V>(*this) - v;
    }
    template <typename U>
    SmemRef& operator*=(U v) {
        return *this = static_cast<V>(*this) * v;
    }
};

template <typename T>
struct SmemPtr {
    T* p = nullptr;
    SmemPtr() = default;
    explicit SmemPtr(T* q) : p(q) {}
    template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
    SmemPtr(SmemPtr<U> o) : p(o.p) {}
    SmemRef<T> operator[](std::ptrdiff_t i) const { return SmemRef<T>{p + i}; }
    SmemRef<T> operator*() const { return SmemRef<T>{p}; }
    SmemPtr operator+(std::ptrdiff_t i) const { return SmemPtr(p + i); }
    SmemPtr operator-(std::ptrdiff_t i) const { return SmemPtr(p - i); }
    SmemPtr& operator+=(std::ptrdiff_t i) {
        p += i;
        return *this;
    }
    SmemPtr& operator-=(std::ptrdiff_t i) {
        p -= i;
        return *this;
    }
    SmemPtr& operator++() {
        ++p;
        return *this;
    }
    // The address itself (alignment checks); reading through it is not checked.
    T* raw() const { return p; }
};

}  // namespace lksim
