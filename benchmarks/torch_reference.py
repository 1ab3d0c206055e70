"""PyTorch reference for mirrormeta's meta-step speed and memory benchmarks.

Second-order MAML on Conv4, written the way learn2learn / higher effectively run it:
parameters are a list of tensors, tasks and the K inner steps are plain Python loops, and
the meta-gradient comes from autograd through the inner gradients:

    φ_0     = θ
    φ_{k+1} = φ_k − α ∇_φ ℓ_trn(φ_k)        # differentiated through unless first-order
    L(θ)    = mean_tasks ℓ_val(φ_K)           # query cross-entropy
    θ      ← Adam(θ, ∇_θ L)

and MetaMiDA the same way (``algorithm='metamida'``): the steps move z in dual space and
φ = ∇h*(z) is MetaMiDA's depth-1 ICNN map in closed form (:func:`icnn_map`, the function of
``mirrormeta.conjugates.icnn``'s defaults), which autograd differentiates:

    z_0 = θ_z,  φ_k = ∇h*(z_k; θ_h),  z_{k+1} = z_k − α ∇_φ ℓ_trn(φ_k),  (θ_z, θ_h) ← Adam

Conv4 is 4 × [conv3x3 (padding 1) → batch norm with batch statistics only (transductive,
no running averages) → ReLU → max-pool 2x2 (floor)] → flatten → linear to n_way.

Variants:
  * ``loops``: ``torch.autograd.grad(..., create_graph=not first_order)`` in Python loops,
    then ``meta_loss.backward()``.
  * ``func``: ``torch.func.grad`` for the inner steps and ``torch.func.grad_and_value``
    for the meta-gradient, Python loop over tasks. ``functional_call`` is not needed: the
    model is already a function of a parameter list. Measured against ``loops``: slower
    on Omniglot (0.79 vs 0.64 s/step), faster on miniImageNet (2.0 vs 2.6 s/step), and
    ~2.3-2.6x the peak memory at K=5 (torch.func keeps more of the nested graph alive).

``torch.func.vmap`` over tasks is deliberately not offered. Measured with torch 2.13 CPU,
it is slower (per-task weights turn each conv into a grouped convolution), and with
transductive batch norm its second-order meta-gradient is silently wrong (~16% off finite
differences in float64): vmap's batching rule for the batch-norm backward mishandles a
per-task batch-norm scale (cf. pytorch/functorch#534). Its first-order gradient is right.

Timing on a shared CPU: with as many torch threads as cores and another process busy,
torch's OpenMP pool collapses (measured on 2 cores: 0.64 s/step idle, 5-60 s/step while
another process used ~1 core). ``threads=1`` or ``OMP_WAIT_POLICY=PASSIVE`` in the
environment (the measuring subprocess inherits it) avoid the collapse but are slower on
an idle CPU (threads=1: 1.13 s/step). Measure on an idle machine, repeat, and report the
spread.

torch is an optional, benchmark-only dependency (extra ``bench``): this module imports
without it and raises ``ImportError`` with install instructions only when called.

Usage::

    python -m benchmarks.torch_reference --shape=omniglot --steps=5 --variant=loops \
        [--algorithm=maml|metamida]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ('loops', 'func')
ALGORITHMS = ('maml', 'metamida')
# mirrormeta.conjugates.icnn's defaults: depth 1, one network per output channel.
ICNN = dict(width=8, mu=1e-2, skip_bound=8.0, out_bound=1.0, out_init=1e-3)
SHAPES = {  # name -> (image_shape HWC, filters): the standard Conv4 settings.
    'omniglot': ((28, 28, 1), 64),
    'mini': ((84, 84, 3), 32),
}


def _torch():
  """Returns the torch module, or raises a clear error when it is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'benchmarks.torch_reference needs PyTorch, a benchmark-only dependency: '
        "pip install 'mirrormeta[bench]' (or pip install torch)") from e
  return torch


def init_conv4(image_shape=(28, 28, 1), filters=64, n_way=5, dtype=None, seed=0,
               device='cpu'):
  """Builds Conv4 parameters as a flat list of leaf tensors.

  Args:
    image_shape: (H, W, C) of the input images; H, W >= 16 (four floor max-pools).
    filters: channels of every conv block.
    n_way: number of output classes.
    dtype: torch dtype (default float32).
    seed: torch RNG seed.
    device: where the parameters live ('cpu', 'cuda').

  Returns:
    [w1, b1, γ1, β1, ..., w4, b4, γ4, β4, W_out, b_out], each ``requires_grad``.
  """
  torch = _torch()
  dtype = dtype or torch.float32
  gen = torch.Generator().manual_seed(seed)
  h, w, c = image_shape
  params = []
  for _ in range(4):
    params += [
        torch.randn(filters, c, 3, 3, generator=gen, dtype=dtype) * (2 / (9 * c))**0.5,
        torch.zeros(filters, dtype=dtype),
        torch.ones(filters, dtype=dtype),
        torch.zeros(filters, dtype=dtype),
    ]
    c, h, w = filters, h // 2, w // 2  # Floor, as max_pool2d: 7 -> 3.
  if h == 0 or w == 0:
    raise ValueError(f'image_shape {image_shape} is too small for Conv4 (need >= 16).')
  feat = c * h * w
  params += [
      torch.randn(n_way, feat, generator=gen, dtype=dtype) * (1 / feat)**0.5,
      torch.zeros(n_way, dtype=dtype),
  ]
  return [p.to(device).requires_grad_() for p in params]


def conv4_apply(params, x_NCHW):
  """Conv4 forward pass with transductive batch norm.

  Args:
    params: list from ``init_conv4`` (or adapted copies of it).
    x_NCHW: images of shape (N, C, H, W).

  Returns:
    Logits of shape (N, n_way).
  """
  f = _torch().nn.functional
  x = x_NCHW
  for i in range(4):
    w, b, gamma, beta = params[4 * i:4 * i + 4]
    x = f.conv2d(x, w, b, padding=1)
    # Batch statistics only, as in MAML's reference code: no running averages.
    x = f.batch_norm(x, None, None, gamma, beta, training=True)
    x = f.max_pool2d(f.relu(x), 2)
  return f.linear(x.flatten(1), params[-2], params[-1])


def init_icnn(params, seed=0):
  """θ_h of MetaMiDA's conjugate for ``params``, as ``mirrormeta.conjugates.icnn()`` builds
  it: one depth-1 ICNN per output channel, which is axis 0 of every torch parameter.

  Returns:
    A flat list of raw leaf tensors, [skip, bias, out, quad] per parameter, each
    ``[channels, width]`` except quad ``[channels]`` (see :func:`icnn_map`).
  """
  torch = _torch()
  gen = torch.Generator().manual_seed(seed)
  width, mu = ICNN['width'], ICNN['mu']
  logit = lambda p: float(torch.logit(torch.tensor(p, dtype=torch.float64)))
  theta_h = []
  for p in params:
    kw = dict(dtype=p.dtype)
    ones = torch.ones(p.shape[0], 1, **kw)
    theta_h += [
        ones * (0.5 * torch.randn(width, generator=gen, **kw)),
        # Kinks spread over [-2, 2] so the network bends at different places.
        ones * (torch.linspace(-2, 2, width, **kw)
                + 0.1 * torch.randn(width, generator=gen, **kw)),
        ones * logit(ICNN['out_init'] / ICNN['out_bound']),
        torch.full((p.shape[0],), float(torch.log(torch.expm1(torch.tensor(1.0 - mu)))), **kw),
    ]
  return [t.to(params[0].device).requires_grad_() for t in theta_h]


def icnn_map(theta_h, z):
  """φ = ∇h*(z; θ_h), per coordinate u of channel b (its raw parameters B̂, c, v̂, Q̂):

      φ = Q u + Σ_w v_w B_w σ'(B_w u + c_w) − Σ_w v_w B_w σ'(c_w)

  with B = M_B tanh(B̂), v = M_v sigmoid(v̂), Q = μ + softplus(Q̂), σ' = sigmoid: the
  gradient of h*_b(u) = (Q/2) u² + vᵀ softplus(B u + c) − u · (its slope at 0), in closed
  form, as a PyTorch user would write it.
  """
  torch = _torch()
  f = torch.nn.functional
  phi = []
  for i, x in enumerate(z):
    skip, c, out, quad = theta_h[4 * i:4 * i + 4]
    b = ICNN['skip_bound'] * torch.tanh(skip)
    vb = ICNN['out_bound'] * torch.sigmoid(out) * b
    slope0 = (vb * torch.sigmoid(c)).sum(-1)
    u = x.reshape(x.shape[0], -1, 1)
    units = vb[:, None, :] * torch.sigmoid(b[:, None, :] * u + c[:, None, :])
    phi.append(((ICNN['mu'] + f.softplus(quad))[:, None] * u[..., 0] + units.sum(-1)
                - slope0[:, None]).reshape(x.shape))
  return phi


def _loss(params, x, y):
  return _torch().nn.functional.cross_entropy(conv4_apply(params, x), y)


def _primal_map(theta_h):
  """z -> φ: MetaMiDA's :func:`icnn_map`, or MAML's identity (theta_h None), so that both
  run the same mirror step z ← z − α ∇_φ ℓ(φ), φ = map(z)."""
  return list if theta_h is None else functools.partial(icnn_map, theta_h)


def meta_loss_loops(params, tasks, steps, inner_lr, first_order=False, theta_h=None):
  """MAML (or MetaMiDA) meta-loss with ``torch.autograd.grad`` in Python loops
  (learn2learn style).

  Args:
    params: list of leaf tensors θ (MetaMiDA: θ_z).
    tasks: list of (x_support, y_support, x_query, y_query).
    steps: number of inner gradient steps K.
    inner_lr: inner step size α.
    first_order: if True the inner gradients are constants (FOMAML).
    theta_h: MetaMiDA's conjugate parameters (:func:`init_icnn`); None: MAML.

  Returns:
    Scalar mean query cross-entropy over tasks, differentiable w.r.t. ``params`` (and
    ``theta_h``).
  """
  torch = _torch()
  primal = _primal_map(theta_h)
  phi0 = primal(params)  # the same for every task: computed once
  losses = []
  for xs, ys, xq, yq in tasks:
    z, phi = params, phi0
    for _ in range(steps):
      grads = torch.autograd.grad(_loss(phi, xs, ys), phi,
                                  create_graph=not first_order)
      z = [zi - inner_lr * g for zi, g in zip(z, grads)]
      phi = primal(z)
    losses.append(_loss(phi, xq, yq))
  return torch.stack(losses).mean()


def meta_loss_func(params, tasks, steps, inner_lr, first_order=False, theta_h=None):
  """MAML (or MetaMiDA) meta-loss with ``torch.func.grad`` inner steps; a pure function of
  ``params`` (and ``theta_h``).

  Args:
    params: sequence of tensors θ (MetaMiDA: θ_z; no autograd state needed).
    tasks: list of (x_support, y_support, x_query, y_query).
    steps: number of inner gradient steps K.
    inner_lr: inner step size α.
    first_order: if True the inner gradients are constants (FOMAML).
    theta_h: MetaMiDA's conjugate parameters (:func:`init_icnn`); None: MAML.

  Returns:
    Scalar mean query cross-entropy over tasks.
  """
  torch = _torch()
  inner_grad = torch.func.grad(_loss)
  primal = _primal_map(theta_h)
  phi0 = primal(params)  # the same for every task: computed once
  losses = []
  for xs, ys, xq, yq in tasks:
    z, phi = params, phi0
    for _ in range(steps):
      grads = inner_grad(phi, xs, ys)
      if first_order:
        grads = [g.detach() for g in grads]
      z = [zi - inner_lr * g for zi, g in zip(z, grads)]
      phi = primal(z)
    losses.append(_loss(phi, xq, yq))
  return torch.stack(losses).mean()


def make_meta_step(variant, params, steps, inner_lr, first_order=False, meta_lr=1e-3,
                   theta_h=None):
  """Returns ``step(tasks) -> meta_loss``, one Adam meta-update of ``params`` (and
  ``theta_h``: MetaMiDA) in place.

  Args:
    variant: one of ``VARIANTS``.
    params: list of leaf tensors θ (MetaMiDA: θ_z).
    steps: inner steps K.
    inner_lr: inner step size α.
    first_order: FOMAML if True.
    meta_lr: Adam learning rate.
    theta_h: MetaMiDA's conjugate parameters (:func:`init_icnn`); None: MAML.
  """
  torch = _torch()
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')
  leaves = list(params) + list(theta_h or [])
  opt = torch.optim.Adam(leaves, lr=meta_lr)
  if variant == 'loops':

    def step(tasks):
      opt.zero_grad(set_to_none=True)
      loss = meta_loss_loops(params, tasks, steps, inner_lr, first_order, theta_h)
      loss.backward()
      opt.step()
      return loss.detach()
  else:
    n = len(params)
    grad_and_loss = torch.func.grad_and_value(
        lambda ls, tasks: meta_loss_func(ls[:n], tasks, steps, inner_lr, first_order,
                                         ls[n:] if theta_h else None))

    def step(tasks):
      # Detached inputs: torch.func differentiates, autograd must not record too.
      grads, loss = grad_and_loss([p.detach() for p in leaves], tasks)
      for p, g in zip(leaves, grads):
        p.grad = g
      opt.step()
      return loss

  return step


def random_tasks(tasks, image_shape, n_way, shot, query, dtype=None, seed=0, device='cpu'):
  """Gaussian images and balanced labels shaped like an N-way K-shot task batch.

  Returns:
    ``tasks`` tuples (x_support (n_way*shot, C, H, W), y_support,
    x_query (n_way*query, C, H, W), y_query).
  """
  torch = _torch()
  gen = torch.Generator().manual_seed(seed)
  h, w, c = image_shape
  out = []
  for _ in range(tasks):
    xs = torch.randn(n_way * shot, c, h, w, generator=gen, dtype=dtype)
    xq = torch.randn(n_way * query, c, h, w, generator=gen, dtype=dtype)
    out.append(tuple(t.to(device) for t in (
        xs, torch.arange(n_way).repeat_interleave(shot),
        xq, torch.arange(n_way).repeat_interleave(query))))
  return out


def available_cores():
  """Cores this process may run on (its affinity mask, not the machine's total)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _maxrss_mb():
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(cfg):
  """The problem of ``cfg`` in this process: (step, tasks, sync, cuda)."""
  torch = _torch()
  torch.set_num_threads(cfg['threads'])
  device = cfg.get('device', 'cpu')
  cuda = device.startswith('cuda')
  if cuda:
    # Let cuDNN pick its fastest algorithms (the shapes never change), as GPU research
    # code usually does; cudnn's TF32 convolutions are PyTorch's default, like XLA's.
    torch.backends.cudnn.benchmark = True
  cfg['image_shape'] = tuple(cfg['image_shape'])  # JSON made it a list.
  params = init_conv4(cfg['image_shape'], cfg['filters'], cfg['n_way'], device=device)
  if cfg['algorithm'] not in ALGORITHMS:
    raise ValueError(f'algorithm must be one of {ALGORITHMS}, got {cfg["algorithm"]!r}')
  theta_h = init_icnn(params) if cfg['algorithm'] == 'metamida' else None
  tasks = random_tasks(cfg['tasks'], cfg['image_shape'], cfg['n_way'], cfg['shot'],
                       cfg['query'], device=device)
  step = make_meta_step(cfg['variant'], params, cfg['steps'], cfg['inner_lr'],
                        cfg['first_order'], theta_h=theta_h)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  return step, tasks, sync, cuda


def _time_steps(step, tasks, sync, cuda, warmup, repeats, rss_before):
  """Times ``repeats`` steps after ``warmup``; the peak memory of the timed steps: the RSS
  high-water mark above ``rss_before``, on CUDA the caching allocator's peak of allocated
  bytes above what was allocated before them."""
  torch = _torch()
  for _ in range(warmup):
    step(tasks)
  sync()
  if cuda:
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    loss = step(tasks)
    sync()  # CUDA kernels run asynchronously: the step ends when they have
    times.append(time.perf_counter() - t0)
  peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda
          else _maxrss_mb() - rss_before)
  return dict(seconds_per_step=statistics.median(times), all=times,
              peak_rss_mb=peak, baseline_rss_mb=rss_before,
              threads=torch.get_num_threads(), loss=float(loss),
              torch_version=torch.__version__)


def _serve(cfg, requests, replies):
  """A :class:`Worker`'s process: builds once, then answers each request line
  ``{"warmup": w, "repeats": r}`` with one JSON line of :func:`_time_steps`' figures."""
  step, tasks, sync, cuda = _build(cfg)
  rss_before = _maxrss_mb()  # torch, parameters and data are resident by now.
  for line in requests:
    req = json.loads(line)
    out = _time_steps(step, tasks, sync, cuda, req['warmup'], req['repeats'], rss_before)
    replies.write(json.dumps(dict(out, device=cfg.get('device', 'cpu'))) + '\n')
    replies.flush()


# What a Worker's subprocess runs; argv[1] is the repository root, so that `benchmarks`
# imports whether or not the project is installed.
_SERVE = '''import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.torch_reference import _serve
_serve(json.loads(sys.stdin.readline()), sys.stdin, sys.stdout)
'''


class Worker:
  """One reference configuration kept alive in a subprocess across measurements.

  Benchmarks that interleave the reference with their own rounds call :meth:`measure`
  once per round: the process, torch's import, CUDA's start-up and cuDNN's algorithm
  search are paid once, not per round (on a GPU those took seconds, more than the steps).
  Memory is then the peak over all measurements so far (on CPU the process's RSS
  high-water mark is monotonic; on CUDA each measurement's own peak).

  Use as a context manager, or call :meth:`close`. Arguments as :func:`time_meta_step`.
  """

  def __init__(self, variant='loops', image_shape=(28, 28, 1), filters=64, n_way=5, shot=1,
               query=15, tasks=4, steps=5, first_order=False, inner_lr=0.01,
               threads=None, device='cpu', algorithm='maml'):
    import tempfile  # pylint: disable=g-import-not-at-top
    _torch()  # Fail here with the clear message rather than inside the child process.
    cfg = dict(variant=variant, image_shape=tuple(image_shape), filters=filters,
               n_way=n_way, shot=shot, query=query, tasks=tasks, steps=steps,
               first_order=first_order, inner_lr=inner_lr,
               threads=threads or available_cores(), device=device, algorithm=algorithm)
    self._stderr = tempfile.TemporaryFile(mode='w+')
    # A plain subprocess, not multiprocessing's spawn: spawn re-imports the caller's
    # __main__, which breaks (or reruns) unguarded benchmark scripts.
    self._proc = subprocess.Popen([sys.executable, '-c', _SERVE, _REPO_ROOT],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True)
    self._proc.stdin.write(json.dumps(cfg) + '\n')
    self._proc.stdin.flush()

  def measure(self, warmup=1, repeats=5) -> dict:
    """Times ``repeats`` steps after ``warmup`` untimed ones; a dict as time_meta_step's."""
    self._proc.stdin.write(json.dumps(dict(warmup=warmup, repeats=repeats)) + '\n')
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      self._proc.wait()
      self._stderr.seek(0)
      raise RuntimeError(f'torch reference measurement failed:\n{self._stderr.read()}')
    return json.loads(line)

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
    self._stderr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def time_meta_step(variant='loops', image_shape=(28, 28, 1), filters=64, n_way=5, shot=1,
                   query=15, tasks=4, steps=5, first_order=False, inner_lr=None,
                   warmup=2, repeats=5, threads=None, device='cpu', algorithm='maml'):
  """Times one Conv4 MAML (or MetaMiDA) meta-step (inner loops, meta-backward, Adam) on
  random data.

  Memory method: everything runs in a fresh Python subprocess (a :class:`Worker` measured
  once), so the RSS high-water
  mark ``getrusage(RUSAGE_SELF).ru_maxrss`` belongs to this configuration alone and
  the caller's memory (e.g. JAX's) is not counted. ``peak_rss_mb`` is that mark after
  the warm-up and timed steps minus the mark just before the first step (torch,
  parameters and data already resident): the peak extra memory of a meta-step, i.e.
  the unrolled graph's activations, the gradients and Adam's state.

  Args:
    variant: 'loops' or 'func' (see the module docstring).
    image_shape: (H, W, C): (28, 28, 1) for Omniglot, (84, 84, 3) for miniImageNet.
    filters: Conv4 channels (64 for Omniglot, 32 for miniImageNet).
    n_way: classes per task.
    shot: support images per class.
    query: query images per class.
    tasks: tasks per meta-batch.
    steps: inner steps K.
    first_order: FOMAML if True.
    inner_lr: inner step size α; None means 0.4 for images up to 28 px, else 0.01.
    warmup: untimed steps first.
    repeats: timed steps.
    threads: ``torch.set_num_threads`` value; None means the cores available.
    device: 'cpu' or 'cuda' (then ``peak_rss_mb`` is the CUDA caching allocator's peak
      of allocated bytes over the timed steps above what was allocated before them).
    algorithm: one of ``ALGORITHMS``.

  Returns:
    dict(seconds_per_step=median seconds, all=list of seconds, peak_rss_mb=float,
    baseline_rss_mb=float, threads=int, loss=float, torch_version=str, device=str).
  """
  if inner_lr is None:
    inner_lr = 0.4 if max(image_shape[:2]) <= 28 else 0.01
  with Worker(variant, image_shape, filters, n_way, shot, query, tasks, steps, first_order,
              inner_lr, threads, device, algorithm) as worker:
    return worker.measure(warmup, repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shape', choices=sorted(SHAPES), default='omniglot')
  parser.add_argument('--variant', choices=VARIANTS, default='loops')
  parser.add_argument('--algorithm', choices=ALGORITHMS, default='maml')
  parser.add_argument('--steps', type=int, default=5, help='inner steps K')
  parser.add_argument('--first_order', action='store_true')
  parser.add_argument('--tasks', type=int, default=4)
  parser.add_argument('--n_way', type=int, default=5)
  parser.add_argument('--shot', type=int, default=1)
  parser.add_argument('--query', type=int, default=15)
  parser.add_argument('--filters', type=int, default=None, help='default: per shape')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=None,
                      help='torch threads; default: the cores available')
  parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
  args = parser.parse_args(argv)
  image_shape, filters = SHAPES[args.shape]
  filters = args.filters or filters
  r = time_meta_step(args.variant, image_shape, filters, args.n_way, args.shot,
                     args.query, args.tasks, args.steps, args.first_order,
                     warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                     device=args.device, algorithm=args.algorithm)
  order = 'first' if args.first_order else 'second'
  print(f'torch {r["torch_version"]} on {args.device}, {r["threads"]} threads | {args.shape} '
        f'{image_shape} filters={filters} {args.n_way}w{args.shot}s {args.query}q '
        f'tasks={args.tasks} K={args.steps} {order}-order {args.algorithm} '
        f'variant={args.variant}')
  times = ' '.join(f'{t:.3f}' for t in r['all'])
  print(f'{r["seconds_per_step"]:.3f} s/step (median; all: {times})')
  if args.device == 'cpu':
    print(f'peak RSS +{r["peak_rss_mb"]:.0f} MB over a {r["baseline_rss_mb"]:.0f} MB '
          'baseline')
  else:
    print(f'peak CUDA memory allocated during the steps: +{r["peak_rss_mb"]:.0f} MB')


if __name__ == '__main__':
  main()
