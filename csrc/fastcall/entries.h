// The public functions' entries (entries.cpp), added to flowkern._fastcall.
#pragma once

#include <Python.h>

// The entry functions, configure() and taken() onto `module`; -1 with a
// Python error set on failure.
int fk_add_entries(PyObject* module);
