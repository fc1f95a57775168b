// Which ISA build of the CPU kernels the registered CPU ops call.
#pragma once

#include "kernel_table.h"

namespace attention_ext::cpu {

const KernelTable& active_kernels();
// nullptr selects the portable build; returns false (and changes nothing) when the
// table's ABI does not match.
bool set_active_kernels(const KernelTable* table);
// Frees the scratch a build keeps between calls (nullptr: the portable build); a table of
// another ABI is left alone.
void release_workspace(const KernelTable* table);

}  // namespace attention_ext::cpu
