"""mirrormeta.conv (a convolution whose derivatives stay canonical) and the runtime
settings (malloc retention, XLA:CPU's low-memory schedule)."""
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mirrormeta import MirrormetaError, conv, models, runtime


def _lax_same(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _nested_grads(c, x, w, q):
  """Value and meta-gradient (second order) of a MAML-like use of convolution c, and a
  third-order derivative in w."""
  def inner(w, x):
    return jnp.sum(jnp.tanh(c(x, w)) * 0.3)

  def outer(w, x):
    gw, gx = jax.grad(inner, argnums=(0, 1))(w, x)
    w2, x2 = w - 0.1 * gw, x - 0.1 * gx
    return jnp.sum(jnp.sin(c(q, w2))) + jnp.sum(jnp.cos(c(x2, w2)))

  value, grads = jax.value_and_grad(outer, argnums=(0, 1))(w, x)
  third = jax.grad(lambda w: jnp.sum(jax.grad(lambda w: jnp.sum(
      jax.grad(lambda w: jnp.sum(jnp.tanh(c(x, w))))(w) ** 2))(w) ** 2))(w)
  return value, grads, third


@pytest.mark.parametrize('k', [1, 3, 5])
def test_conv_equals_lax_to_third_order(k):
  with jax.enable_x64():
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((3, 7, 6, 4)))   # non-square, odd and even sizes
    w = jnp.asarray(rng.standard_normal((k, k, 4, 5)))
    q = jnp.asarray(rng.standard_normal((2, 7, 6, 4)))
    got = _nested_grads(conv.conv, x, w, q)
    want = _nested_grads(_lax_same, x, w, q)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def _conv_forms(fn, *args) -> set:
  """The distinct convolution forms (dimension numbers, padding, dilations) in fn's jaxpr."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        p = eqn.params
        found.add((p['dimension_numbers'], tuple(map(tuple, p['padding'])), p['lhs_dilation'],
                   p['rhs_dilation'], p['window_strides']))
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_higher_derivatives_keep_the_forms_of_the_first():
  """The point of mirrormeta.conv: 2nd and 3rd derivatives of a two-layer net use only the
  convolution forms of its gradient (lax's own rules add permuted ones at every order)."""
  x = jnp.ones((2, 6, 6, 3))
  w = (jnp.ones((3, 3, 3, 4)), jnp.ones((3, 3, 4, 4)))
  square_sum = lambda g: sum(jnp.sum(a ** 2) for a in g)
  for c, grows in ((conv.conv, False), (_lax_same, True)):
    f = lambda w: jnp.sum(jnp.tanh(c(jnp.tanh(c(x, w[0])), w[1])))
    g1 = jax.grad(f)
    g2 = jax.grad(lambda w: square_sum(g1(w)))
    g3 = jax.grad(lambda w: square_sum(g2(w)))
    forms = [_conv_forms(g, w) for g in (g1, g2, g3)]
    assert (forms[0] != forms[1] != forms[2]) == grows, (c, [len(f) for f in forms])
    assert forms[0] <= forms[1] <= forms[2]


def test_drop_in_takes_the_fast_path_only_where_it_applies():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  dims = ('NHWC', 'HWIO', 'NHWC')
  uses_custom = lambda *a, **k: 'custom_vjp' in str(jax.make_jaxpr(
      lambda x, w: conv.conv_general_dilated(x, w, *a, **k))(x, w))
  assert uses_custom((1, 1), 'SAME', dimension_numbers=dims)
  assert uses_custom((1, 1), [(1, 1), (1, 1)], dimension_numbers=dims)
  cases = [((2, 2), 'SAME', {}), ((1, 1), 'VALID', {}), ((1, 1), 'SAME', {'rhs_dilation': (2, 2)}),
           ((1, 1), [(0, 2), (1, 1)], {})]
  for strides, padding, extra in cases:
    assert not uses_custom(strides, padding, dimension_numbers=dims, **extra)
    np.testing.assert_array_equal(
        conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims, **extra),
        lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims, **extra))


def test_weight_gradient_image_by_image_equals_the_batched_one():
  """The 'auto' weight gradient, on CPU a sum of one-image convolutions where
  conv._per_image says it pays, equals XLA's whole-batch one through second order, and the
  compiled CPU program does hold one weight-gradient convolution per image."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((30, 14, 14, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)), jnp.float32) * 0.05
  assert conv._per_image(x, x) and not conv._per_image(x[:5], x[:5])
  loss = lambda form, x: lambda w: jnp.sum(jnp.tanh(conv.conv(x, w, form)) ** 2)
  second = lambda form, x: lambda w: jnp.sum(jax.grad(loss(form, x))(w) ** 2)
  with jax.enable_x64():  # the same sum in another order: equal to float64 rounding
    for order in (loss, second):
      auto, batched = (jax.jit(jax.grad(order(form, x.astype(jnp.float64))))(
          w.astype(jnp.float64)) for form in conv.WGRAD_FORMS)
      np.testing.assert_allclose(auto, batched, rtol=1e-10, atol=1e-10 * np.abs(batched).max())
  loss = functools.partial(loss, x=x)
  count = lambda form: jax.jit(jax.grad(loss(form))).lower(w).compile().as_text().count(
      ' convolution(')
  # forward + weight gradient(s); other backends keep XLA's form (lax.platform_dependent)
  per_image = jax.default_backend() == 'cpu' and runtime.ynnpack_convolutions()
  assert (count('auto'), count('batched')) == (1 + (30 if per_image else 1), 1 + 1)
  drop_in = models.CONVOLUTIONS['mirrormeta_batched_wgrad']
  dims = ('NHWC', 'HWIO', 'NHWC')
  assert count('batched') == jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(drop_in(
      x, w, (1, 1), 'SAME', dimension_numbers=dims)) ** 2))).lower(w).compile().as_text().count(
          ' convolution(')
  with pytest.raises(MirrormetaError, match="wgrad_form must be one of"):
    jax.grad(loss('per_pixel'))(w)


def test_conv4_meta_gradient_same_with_either_convolution_and_layout():
  """Second-order MAML meta-gradient of Conv4 (transductive BN) with mirrormeta.conv vs lax,
  and with channels-first activations: the same parameters (names, shapes, init) and the
  same meta-gradient."""
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.standard_normal((5, 28, 28, 1)), jnp.float32)
  xq = jnp.asarray(rng.standard_normal((10, 28, 28, 1)), jnp.float32)
  ys, yq = jnp.arange(5) % 5, jnp.arange(10) % 5
  grads, inits = {}, {}
  variants = [(impl, 'NHWC') for impl in models.CONVOLUTIONS] + [('mirrormeta', 'NCHW')]
  for impl, layout in variants:
    model = models.functional(models.Conv4(num_classes=5, filters=8, conv=impl, layout=layout),
                              xs[:1])
    loss = models.classification_loss(model.apply)
    params = inits[impl, layout] = model.init(jax.random.key(0))

    def meta(p):
      g = jax.grad(lambda p: loss(p, (xs, ys))[0])(p)
      return loss(jax.tree.map(lambda a, b: a - 0.4 * b, p, g), (xq, yq))[0]

    grads[impl, layout] = jax.jit(jax.grad(meta))(params)
  reference = variants[0]
  for variant in variants[1:]:
    chex.assert_trees_all_equal(inits[variant], inits[reference])
    chex.assert_trees_all_close(grads[variant], grads[reference], rtol=2e-4, atol=2e-5)


def test_resnet12_same_in_either_layout():
  x = jax.random.normal(jax.random.key(2), (6, 20, 20, 3))
  make = lambda layout: models.functional(
      models.ResNet12(num_classes=5, widths=(8, 12, 16, 20), layout=layout), x[:1])
  nhwc, nchw = make('NHWC'), make('NCHW')
  params = nhwc.init(jax.random.key(0))
  chex.assert_trees_all_equal(nchw.init(jax.random.key(0)), params)
  # Jitted: op by op, the ResNet's gradient took ~30 s to dispatch on a 2-core CPU.
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x)))))(params)
  apply = lambda m: jax.jit(m.apply)(params, x)
  np.testing.assert_allclose(apply(nchw), apply(nhwc), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(grad(nchw), grad(nhwc), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_retain_freed_memory_applies_once():
  first = runtime.retain_freed_memory()
  assert first is runtime.retain_freed_memory()
  assert isinstance(first, bool)


def _child_output_without_and_with(code: str, args=('0', '1')) -> dict[str, list[str]]:
  """Runs ``code`` in fresh CPU processes with argv[1] '0' and '1' (or ``args``; no inherited
  XLA_FLAGS); returns each one's stdout words."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  out = {}
  for arg in args:
    proc = subprocess.run([sys.executable, '-c', code, arg], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[arg] = proc.stdout.split()
  return out


# Allocates, frees and reallocates 2.3 GB in a fresh process and prints the page faults of
# the second allocation; argv[1] == '1' retains freed memory first.
_FAULTS_CHILD = """import resource, sys
import numpy as np
from mirrormeta import runtime
if sys.argv[1] == '1':
  assert runtime.retain_freed_memory()
n = 2_300_000_000  # more than glibc's largest finite trim threshold (2**31 - 1 bytes)
a = np.ones(n, np.uint8); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(n, np.uint8); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_retain_freed_memory_reuses_pages_of_a_freed_slab_over_2gb():
  faults = {k: int(words[-1]) for k, words in _child_output_without_and_with(_FAULTS_CHILD).items()}
  # Default malloc unmaps the slab and faults it in again (~1100 faults with numpy's 2 MB
  # pages, 560k with 4 kB ones); retained, its pages are reused. With a finite trim
  # threshold the heap top (> 2 GB) was given back and faulted in again here too.
  assert faults['0'] > 500 and faults['1'] * 20 < faults['0'], faults


# Retains freed memory in a fresh process, asynchronous (argv[1] '0', JAX's default) or
# synchronous ('1') dispatch, or synchronous on 2 CPU devices ('2'), and prints the arenas
# chosen and whether a new thread's 1 MB block lies in the main arena (below the program
# break; other arenas are mmap'd heaps).
_ARENA_CHILD = """import ctypes, sys, threading
from mirrormeta import runtime
if sys.argv[1] in '12':
  runtime.synchronous_dispatch()
if sys.argv[1] == '2':
  runtime.cpu_devices(2)
assert runtime.retain_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_ssize_t]
out = {}
def worker():
  out['ptr'] = libc.malloc(1 << 20)
  out['brk'] = libc.sbrk(0)
t = threading.Thread(target=worker); t.start(); t.join()
import jax
print(runtime.applied_arenas(), out['ptr'] <= out['brk'], len(jax.devices()))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_retain_freed_memory_gives_threads_their_own_arenas_under_synchronous_dispatch():
  out = _child_output_without_and_with(_ARENA_CHILD, args=('0', '1', '2'))
  # Asynchronous, or with several CPU devices (whose programs JAX dispatches
  # asynchronously), a worker thread allocates the step's slab, so all share the main
  # arena; inline on one device, the worker threads keep their own (benchmarks.arenas: a
  # step compiled in the process ran 1.4x slower in one arena).
  assert out['0'] == ['one', 'True', '1'] and out['1'] == ['per_thread', 'False', '1'], out
  assert out['2'] == ['one', 'True', '2'], out
  with pytest.raises(MirrormetaError, match='arenas must be one of'):
    runtime.retain_freed_memory('two')


@pytest.mark.parametrize('bad', [0, -1, 1.5, True, '2'])
def test_cpu_devices_refuses_bad_counts(bad):
  with pytest.raises(MirrormetaError, match='cpu_devices needs an integer >= 1'):
    runtime.cpu_devices(bad)


def test_cpu_devices_refuses_after_the_backend_started():
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  with pytest.raises(MirrormetaError, match='before the first JAX computation'):
    runtime.cpu_devices(runtime.configured_cpu_devices() + 1)


# Compiles a small MLP meta-step (4 tasks of 500 points, loop tasks, K=3) in a fresh
# process and prints XLA's temp bytes; argv[1] == '1' asks for the low-memory schedule.
_SCHEDULE_CHILD = """import sys
from mirrormeta import runtime
if sys.argv[1] == '1':
  runtime.low_memory_schedule()
import jax, jax.numpy as jnp, optax
import mirrormeta as mm
from mirrormeta import conjugates, models
model = models.functional(models.MLP(hidden=(256, 256)), jnp.zeros((4, 1)))
conj = conjugates.euclidean()
meta = mm.make_meta_step(conj.apply, models.regression_loss(model.apply), optax.adam(1e-3),
                         steps=3, lr=0.01, strategy=mm.Strategy('loop', True))
state = meta.init(mm.init_meta_params(conj, model.init(jax.random.key(0)), jax.random.key(1)))
xy = (jnp.zeros((4, 500, 1)), jnp.zeros((4, 500, 1)))
print(jax.jit(meta.step).lower(state, xy, xy).compile().memory_analysis().temp_size_in_bytes)
"""


def test_low_memory_schedule_reaches_xla_and_lowers_memory():
  temp = {k: int(words[-1]) for k, words in _child_output_without_and_with(_SCHEDULE_CHILD).items()}
  # 33.9 vs 31.5 MB when written (Conv4 K=5: 420 vs 280 MB): the flag took effect.
  assert temp['1'] < 0.98 * temp['0'], temp


# Runs a jitted step in a fresh process as the runner does (the state donated) and prints
# the share of its time a call takes to return; argv[1] == '1' dispatches synchronously.
_DISPATCH_CHILD = """import sys, time
from mirrormeta import runtime
if sys.argv[1] == '1':
  runtime.synchronous_dispatch()
import jax, jax.numpy as jnp
def step(s, x):
  h = jnp.tanh(s @ x)
  return s + 1e-3 * (jnp.tanh(h @ x) @ x), jnp.sum(h)
f = jax.jit(step, donate_argnums=0)
x, s = jnp.full((2560, 2560), 1e-3), jnp.full((2560, 2560), 1e-3)
s, m = jax.block_until_ready(f(s, x))
t = time.perf_counter(); s, m = f(s, x); returned = time.perf_counter() - t
jax.block_until_ready(s); total = time.perf_counter() - t
print(returned / total)
"""


def test_synchronous_dispatch_runs_steps_inline():
  returned = {k: float(words[-1])
              for k, words in _child_output_without_and_with(_DISPATCH_CHILD).items()}
  # Asynchronous (the control, JAX's default), the call returns at once; inline, when the
  # step is done, so its temporaries are freed before the next step takes its own. That
  # memory effect depends on the allocator's placement of small buffers, so it is measured
  # by benchmarks.dispatch over real meta-steps (1.0x vs 3.0x XLA's peak), not asserted:
  # in a toy step here, inline steps rose 0 MB in most processes, 100 MB in one in six.
  assert returned['0'] < 0.5 and returned['1'] > 0.9, returned


@pytest.mark.parametrize('setting', ['low_memory_schedule', 'threaded_convolutions',
                                     'synchronous_dispatch'])
def test_process_settings_refused_once_jax_started(monkeypatch, setting):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  jax.devices()  # the backend has started
  # conftest dispatches synchronously, as the runner does; asynchronous, the call must
  # refuse (a setting already in force is not refused).
  jax.config.update('jax_cpu_enable_async_dispatch', True)
  try:
    with pytest.raises(MirrormetaError,
                       match=f'{setting}.. must be called before the first JAX'):
      getattr(runtime, setting)()
    assert 'XLA_FLAGS' not in os.environ
    assert jax.config.read('jax_cpu_enable_async_dispatch')
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', False)


# Compiles a Conv4-sized NHWC convolution (YNNPACK leaves tiny ones to XLA) in a fresh
# process and prints how often its compiled program names a YNNPACK fusion and a
# convolution; argv[1] == '1' asks for XLA's own convolutions.
_CONV_CHILD = """import sys
from mirrormeta import runtime
if sys.argv[1] == '1':
  runtime.threaded_convolutions()
import jax, jax.numpy as jnp
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
x, k = jnp.zeros((8, 28, 28, 64)), jnp.zeros((3, 3, 64, 64))
text = jax.jit(conv).lower(x, k).compile().as_text()
print(text.count('__ynn_fusion'), text.count('convolution('))
"""


def test_threaded_convolutions_reaches_xla():
  counts = {k: tuple(int(n) for n in words[-2:])
            for k, words in _child_output_without_and_with(_CONV_CHILD).items()}
  # By default the convolution is a YNNPACK fusion; with the flag it is XLA's own.
  assert counts['0'][0] >= 1 and counts['1'] == (0, 1), counts
