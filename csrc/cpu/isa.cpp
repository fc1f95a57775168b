#include "isa.h"

#include <atomic>

#include "kernels/kernels.h"

namespace attention_ext::cpu {
namespace {
// The portable build compiled into _C is the fallback until Python picks a faster one.
std::atomic<const KernelTable*> g_active{nullptr};
}  // namespace

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  return t ? *t : *kernel_table();
}

bool set_active_kernels(const KernelTable* table) {
  if (table && table->abi_version != kKernelAbiVersion) return false;
  g_active.store(table, std::memory_order_release);
  return true;
}

void release_workspace(const KernelTable* table) {
  if (!table) table = kernel_table();
  if (table->abi_version == kKernelAbiVersion) table->release_workspace();
}

}  // namespace attention_ext::cpu
