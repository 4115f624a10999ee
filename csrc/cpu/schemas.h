// The schema of every kernel-level op, from the one list in
// flowkern/ops/schemas.inc, which Python reads too (the flowkern_triton::
// ops): flowkern:: (schemas.cpp), flowkern_sim:: (cuda_sim_glue.cpp) and the
// no-autograd kernels (nograd.cpp) all take their names and schemas from here.
#pragma once

#include <string_view>

namespace flowkern_cpu {

// In file order: "name(args) -> returns" or "name.overload(args) -> returns".
inline constexpr const char* kSchemas[] = {
#define FK_SCHEMA(schema) schema,
#include "../../flowkern/ops/schemas.inc"
#undef FK_SCHEMA
};

// "name" or "name.overload": the schema up to its argument list.
constexpr std::string_view schema_name(std::string_view schema) {
  return schema.substr(0, schema.find('('));
}

// Defines every op of the list in library m.
template <class Library> void define_schemas(Library& m) {
  for (const char* schema : kSchemas) m.def(schema);
}

}  // namespace flowkern_cpu
