"""Triton's interpreter without its repeated set-up: for the tests, which run the fused kernels in it.

Each call of a ``@triton.jit`` helper inside an interpreted kernel (``_round``, ``tl.sum``,
``tl.sigmoid``, ... thousands per launch) calls the interpreter's ``_patch_lang``, which scans
``triton.language`` with ``inspect.getmembers`` to swap its builtins for interpreted ones. Within one
launch that is done again and again for the same modules: the first call has already swapped them, and
nothing swaps them back before the launch ends. In the kit's kernel tests it was over half of the
interpreter's time.

``install()`` keeps the first such set-up of each set of language modules in a launch and skips the
repeats; every launch still starts from triton's own set-up and ends with its own restore, so what runs
is the same interpreted arithmetic.

It also skips the integer-overflow checks that the interpreter computes and then throws away: with
``sanitize_overflow`` on (the interpreter's default), every integer ``+``, ``-`` and ``*`` (the kernels'
offsets) is redone in int64 and compared with the int32 range, and the result goes to ``device_assert``,
which does nothing unless the interpreter's ``debug`` option is on; it is off, and nothing in triton turns it
on. That was about a quarter of an interpreted solve. (Compiled, the kernels have no such check either:
triton turns ``sanitize_overflow`` off unless ``debug`` is on.) And ``_get_np_dtype``, which builds a table
of twenty numpy dtypes on each of its calls (one per interpreted operation or more), keeps its answers.

If this triton's interpreter is not laid out as expected (another version), nothing is changed and the
tests only run slower. KIT_TEST_PLAIN_INTERPRETER=1 switches it off.
"""
import dataclasses
import inspect
import os

_NOTHING_TO_RESTORE = type("NothingToRestore", (), {"restore": lambda self: None})()
UNDO = None  # install()'s undo, while it is installed


def install():
    """Returns a function that puts the interpreter back as it was, or None where nothing was changed."""
    if os.environ.get("KIT_TEST_PLAIN_INTERPRETER") == "1":
        return None
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    real_patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None or getattr(real_patch, "_kit_once", False):
        return None
    params = list(inspect.signature(real_patch).parameters)
    if params != ["fn"] or "_patch_lang(self.fn)" not in inspect.getsource(executor.__call__):
        return None
    builder, real_options = getattr(interpreter, "interpreter_builder", None), None
    semantic = getattr(getattr(interpreter, "interpreter_semantic", None), "device_assert", None)
    options = getattr(builder, "options", None)
    if (dataclasses.is_dataclass(options) and getattr(options, "debug", True) is False
            and getattr(options, "sanitize_overflow", False) is True and semantic is not None
            and "if not self.builder.options.debug:\n            return" in inspect.getsource(semantic)):
        real_options = options  # the checks' only consumer, device_assert, returns at once without debug
    real_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    np_dtypes = {}  # (a pointer?, the scalar type's name) -> numpy dtype: what _get_np_dtype's answer depends on

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        key = (isinstance(scalar, tl.pointer_type), scalar.name)
        found = np_dtypes.get(key)
        if found is None:
            found = np_dtypes[key] = real_np_dtype(scalar)
        return found

    launch = {"done": None}  # the language modules set up in the launch that is running
    langs = {}  # function -> the language modules its globals hold (what _patch_lang sets up for it)

    def patch_once(fn):
        done = launch["done"]
        if done is None:
            return real_patch(fn)
        key = langs.get(fn)
        if key is None:
            key = langs[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        if key in done:
            return _NOTHING_TO_RESTORE
        done.add(key)
        return real_patch(fn)

    real_call = executor.__call__

    def call(self, *args, **kwargs):
        outer, launch["done"] = launch["done"], set()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            launch["done"] = outer

    def undo():
        global UNDO
        interpreter._patch_lang, executor.__call__, UNDO = real_patch, real_call, None
        if real_options is not None:
            builder.options = real_options
        if real_np_dtype is not None:
            interpreter._get_np_dtype = real_np_dtype

    global UNDO
    patch_once._kit_once = True
    interpreter._patch_lang, executor.__call__, UNDO = patch_once, call, undo
    if real_options is not None:
        builder.options = dataclasses.replace(real_options, sanitize_overflow=False)
    if real_np_dtype is not None:
        interpreter._get_np_dtype = np_dtype
    return undo
