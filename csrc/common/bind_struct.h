// Binds a plain parameter struct (LayerArgs, DecodeParams) to Python by field name. Each field is
// named once (field() / address()); from that one list come
//   - attributes of a Python class S: scalar and enum fields as themselves, pointer fields as
//     integer addresses (tensor.data_ptr(); 0 = nullptr), so the kernels stay on raw pointers and
//     the extensions never link libtorch;
//   - a keyword constructor S(name=value, ...) (fields not named keep the struct's defaults);
//   - fill(): the same keywords read straight from a vectorcall (kwnames), for kernel entry points
//     called as f(name=value, ...) (def_fastcall below).
// Why the vectorcall path: the layer is called once per layer per decode step, and pybind11's own
// keyword dispatch copies the keywords into a dict (about 2 us for 28 fields, measured), where
// one attribute assignment per field costs a pybind11 dispatch each (about 5 us). Reading the
// kwnames tuple directly costs about what the old positional call did.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>

namespace personamoe {

// The field list of S: name -> how to store a Python value into an S.
template <typename S>
class StructFields {
 public:
  using Setter = std::function<void(S&, pybind11::handle)>;

  static StructFields& instance() {
    static StructFields fields;
    return fields;
  }

  // Keys point at string literals (field() / address() arguments), which live forever.
  void add(const char* name, Setter setter) { setters_[name] = std::move(setter); }

  void set(S& s, PyObject* name, pybind11::handle value) const {
    Py_ssize_t len = 0;
    const char* key = PyUnicode_AsUTF8AndSize(name, &len);
    if (key == nullptr) throw pybind11::error_already_set();
    const auto it = setters_.find(std::string_view(key, static_cast<size_t>(len)));
    if (it == setters_.end())
      throw pybind11::type_error(std::string(type_name) + " has no field '" + key + "'");
    it->second(s, value);
  }

  // The keyword arguments of a vectorcall: kwnames[i] = values[i] (nullptr kwnames: none).
  void fill(S& s, PyObject* const* values, PyObject* kwnames) const {
    if (kwnames == nullptr) return;
    const Py_ssize_t n = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < n; ++i) set(s, PyTuple_GET_ITEM(kwnames, i), values[i]);
  }

  const char* type_name = "";

 private:
  std::unordered_map<std::string_view, Setter> setters_;
};

template <typename S>
class StructBinding {
 public:
  // module_local: the real and the emulated _C_cuda (tests) may both be loaded in one process.
  StructBinding(pybind11::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc, pybind11::module_local()) {
    StructFields<S>::instance().type_name = name;
  }

  // A field that Python reads and writes as its own type (int, float, bool, an enum of codes.h).
  template <typename V>
  StructBinding& field(const char* name, V S::*member) {
    cls_.def_readwrite(name, member);
    StructFields<S>::instance().add(
        name, [member](S& s, pybind11::handle v) { s.*member = v.cast<V>(); });
    return *this;
  }

  // A pointer field, read and written as an integer address.
  template <typename P>
  StructBinding& address(const char* name, P* S::*member) {
    cls_.def_property(
        name, [member](const S& s) { return reinterpret_cast<std::uintptr_t>(s.*member); },
        [member](S& s, std::uintptr_t v) { s.*member = reinterpret_cast<P*>(v); });
    StructFields<S>::instance().add(name, [member](S& s, pybind11::handle v) {
      s.*member = reinterpret_cast<P*>(v.cast<std::uintptr_t>());
    });
    return *this;
  }

  // Registers S(**fields). Call after the fields.
  pybind11::class_<S>& done() {
    cls_.def(pybind11::init([](const pybind11::kwargs& kw) {
      S s{};
      for (auto item : kw) StructFields<S>::instance().set(s, item.first.ptr(), item.second);
      return s;
    }));
    return cls_;
  }

 private:
  pybind11::class_<S> cls_;
};

// Adds m.<name> as a METH_FASTCALL | METH_KEYWORDS function running Impl(args, nargs, kwnames)
// (a plain function returning a new reference), with C++ exceptions raised as Python ones.
template <PyObject* (*Impl)(PyObject* const*, Py_ssize_t, PyObject*)>
void def_fastcall(pybind11::module_& m, const char* name, const char* doc) {
  struct Trampoline {
    static PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
      try {
        return Impl(args, nargs, kwnames);
      } catch (pybind11::error_already_set& e) {
        e.restore();
      } catch (pybind11::cast_error& e) {  // a field of the wrong type
        PyErr_SetString(PyExc_TypeError, e.what());
      } catch (pybind11::builtin_exception& e) {
        e.set_error();
      } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
      }
      return nullptr;
    }
  };
  static PyMethodDef def{
      name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&Trampoline::call)),
      METH_FASTCALL | METH_KEYWORDS, doc};
  PyObject* f = PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr());
  if (f == nullptr) throw pybind11::error_already_set();
  m.add_object(name, pybind11::reinterpret_steal<pybind11::object>(f));
}

}  // namespace personamoe
