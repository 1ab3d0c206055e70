"""Defaults shared by every named config (DESIGN.md §2); each named config overrides a few.

Not a config itself: ``get_config(dataset)`` is called by the named configs. The defaults
are those of the MetaMiDA authors' earlier public code (MetaMirrorDescent, PyTorch), the
closest known to the paper's settings: 5-way, 15 query images per class in training,
60,000 meta-iterations of 4 tasks, 5 inner steps at inner lr 1e-2, Conv4-64 with
transductive batch norm, meta-optimizer SGD (lr 1e-3, Nesterov 0.9, weight decay 1e-4,
lr x0.1 every 20,000 iterations; Adam on Omniglot), validation every 2,000 iterations on
1,000 tasks keeping the best-validation checkpoint, test on 1,000 tasks.

Fields (all overridable as ``--config.<field>=<value>``):

  name: the config's name (used in the default workdir ``runs/<name>_<algorithm>``).
  dataset: one of ``mirrormeta.data.DATASETS``.
  data_dir: the dataset folder; default ``<repo>/../shared/data/<folder>`` if it exists,
    else ``~/data/<folder>`` (folder: the dataset name; ``cifar100`` for cifarfs and
    fc100, which are built from the same CIFAR-100 files).
  image_size: images are resized to this (None: the dataset's standard size).
  cache_dir: where decoded splits are cached ('' : the data layer's default).
  n_way, shot, query: the training task shape (query = query images per class).
  eval_query: query images per class in validation and test tasks.
  algorithm: maml | fomaml | metasgd | metacurvature | metamida (mirrormeta.algorithms).
  first_order: drop second-order terms of the meta-gradient (always on for fomaml).
  model: conv4 | resnet12 | mlp; filters (conv4), resnet_widths, mlp_hidden.
  inner_steps: K, mirror-descent steps per task in training.
  eval_inner_steps: K at validation and test (None: inner_steps); results report the
    query accuracy after every step 0..K.
  inner_lr: α, the inner (dual-space) step size.
  meta_batch: tasks per meta-iteration.
  num_steps: meta-iterations. Can be raised when resuming a finished run.
  optimizer: name (sgd | adam), lr, momentum and nesterov (sgd), weight_decay (added to
    the gradient of θ_z only: θ_h's raw parameters are not shrunk towards 0, which for
    the ICNN is not the identity map), decay_every/decay_factor (staircase step decay of
    the lr; 0 = constant), clip_norm (global-norm clipping of the meta-gradient; 0 = off).
  eval_every: validate (and maybe save the best checkpoint) every this many steps.
  val_tasks, test_tasks: tasks per validation / final test (the paper: >= 600).
  val_curve: validation also reports the query metric after every step 0..K (TensorBoard
    ``val/<metric>_per_step``), not only after step K. Off: it evaluates the query set K+1
    times instead of once, 3.5x validation's work at K=5 (mini_1shot, 25 tasks: 2,507 vs
    706 GFLOP, XLA's count). The test always reports the whole curve.
  eval_batch: tasks per evaluation call (0: 1 with the 'loop' strategy, 25 with 'vmap').
  eval_checkpoint: which checkpoint the final test uses: best (validation) | latest.
  log_every: TensorBoard scalars every this many steps.
  checkpoint_every: save the latest checkpoint every this many steps (also at the end,
    and on Ctrl-C).
  keep_checkpoints: latest checkpoints kept.
  seed: fixes the initialisation and every task drawn (task t of step s is a function of
    (seed, s, t)), so an interrupted run resumes exactly.
  icnn: the MetaMiDA conjugate: every argument of mirrormeta.conjugates.icnn (width,
    depth, mu, bounds, granularity, ...), defaulting to the library's defaults.
  strategy: how tasks and steps execute (mirrormeta.Strategy): tasks auto | vmap | loop
    ('auto': the backend's measured best, vmap for MLPs), unroll (scan unroll of the K
    steps; 0 = fully unrolled), remat; map_remat: auto | checkpoint | tied, how the
    meta-gradient recomputes φ = ∇h*(z) (mirrormeta.core.primal_map; 'auto': the
    backend's default); conv: mirrormeta | mirrormeta_batched_wgrad | lax, how Conv4 /
    ResNet-12 convolutions and their derivatives are computed
    (mirrormeta.models.CONVOLUTIONS);
    layout: auto | NHWC | NCHW, their activations' memory layout (mirrormeta.models.LAYOUTS;
    'auto': mirrormeta.models.default_layout(), the backend's measured faster one);
    icnn_block_major: the MetaMiDA map computes kernels' channel blocks as [channels, rest]
    (mirrormeta.conjugates.icnn's block_major; same function, less memory; on CPU faster
    at K=1, 4, 5 and ~5% slower at K=2 on Omniglot-shaped tasks, where False is faster;
    XLA's map only: the native one reads tensors in their own order);
    icnn_map: auto | native | xla, how the MetaMiDA map is computed: 'native' is the CPU
    kernel of mirrormeta.native (depth 1, 'channel' granularity; built on first use with
    the system C++ compiler; reverse mode only), 'xla' XLA's own ops; 'auto':
    native on CPU where it applies and builds (the Omniglot Conv4 K=5 step: 0.95x the time).
  num_devices: devices the meta-batch is split over (0 = all visible; must divide it). On
    CPU, 1 means the host, split into cpu_devices.
  cpu_devices: XLA:CPU devices the host's cores are split into, the meta-batch split over
    them (mirrormeta.runtime.cpu_devices). Each device runs its tasks as a program of its
    own, so they never wait for another device's tasks' buffers as the tasks of one
    program do, and compiles in about half the time. But JAX dispatches such programs
    asynchronously, so they allocate on worker threads and share one malloc arena, which
    a compile in the process fragments; hence compile_ahead. MetaMiDA's Omniglot Conv4
    K=5 step on 2 devices took 0.26 s loaded from the compilation cache (one device:
    0.30-0.31 s); the runner's first run of omniglot_5w1s, compiling ahead, 3.14 steps/s
    (one device: 2.84-2.86). 1 by default (measured on Omniglot's Conv4 only);
    omniglot_5w1s sets 2 (README, Performance). The meta-batch must split evenly.
    Evaluation stays on one device. No effect on GPU/TPU runs.
  distributed: multi-process settings (mirrormeta.parallel.maybe_initialize_distributed):
    coordinator_address, num_processes, process_id, auto.
  progress: show a progress bar.
  retain_freed_memory: let glibc's malloc keep freed memory for reuse
    (mirrormeta.runtime.retain_freed_memory): XLA:CPU otherwise page-faults each step's
    temporaries in again (Conv4 MAML step 1.34x slower); under synchronous_dispatch each
    thread keeps its own malloc arena (a step compiled in the run, as a first run's is,
    took 0.73x the time of one shared arena); no effect on other allocators.
  low_memory_schedule: XLA:CPU's memory-ordered instruction scheduler
    (mirrormeta.runtime.low_memory_schedule): Conv4 K=5 meta-step peak memory 0.5-0.67x,
    but ~1.35x slower; for runs bound by memory. No effect on GPU/TPU.
  threaded_convolutions: XLA:CPU's own multi-threaded convolutions instead of YNNPACK's
    single-threaded ones (mirrormeta.runtime.threaded_convolutions): on 84x84 images with
    Conv4-32 both MAML and MetaMiDA steps are faster (~15% and ~25%) and MetaMiDA no longer
    idles a core; with Conv4-64 there it made no clear difference, and Omniglot-shaped
    steps are 1.1-1.6x slower. Measure before turning it on. No effect on GPU/TPU.
  compile_ahead: compile the meta-step, validation and test programs in fresh processes,
    one per core at once, into the persistent compilation cache, and load them in the run
    (mirrormeta.ahead; CPU, single-process runs with the cache on). A compile leaves the
    run's malloc heap fragmented; where all threads share one arena (cpu_devices > 1) the
    steps after it then ran 1.56x slower, and loading does not fragment it. None (default):
    only there; with an arena per thread the steps ran alike and loading the programs back
    cost more than it saved (README, Performance). Programs compiled ahead once are not
    compiled again.
  synchronous_dispatch: run each CPU computation inline (mirrormeta.runtime.
    synchronous_dispatch): with JAX's asynchronous dispatch the next step allocates its
    temporaries before XLA:CPU frees the last step's, and the retained heap holds three
    or four steps' worth; inline, one, and the steps took 0.74-0.92x the time
    (benchmarks/results/dispatch_cpu.md). No effect on GPU/TPU.
"""
import inspect
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from mirrormeta import conjugates

# Folder names under a data root; cifarfs and fc100 are both cut from CIFAR-100.
DATA_FOLDERS = {'omniglot': 'omniglot', 'miniimagenet': 'miniimagenet',
                'tieredimagenet': 'tieredimagenet', 'cub': 'cub', 'cifarfs': 'cifar100',
                'fc100': 'cifar100', 'sinusoid': ''}
SHARED_DATA = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'


def default_data_dir(dataset: str) -> str:
  """``<repo>/../shared/data/<folder>`` if it exists, else ``~/data/<folder>``."""
  folder = DATA_FOLDERS.get(dataset, dataset)
  if not folder:
    return ''
  shared = SHARED_DATA / folder
  return str(shared) if shared.is_dir() else str(Path('~/data') / folder)


def icnn_defaults() -> dict:
  """Every argument of ``mirrormeta.conjugates.icnn`` that defines the conjugate, with the
  library's default value (``block_major``, how it is computed, is
  ``strategy.icnn_block_major``)."""
  return {name: p.default for name, p in
          inspect.signature(conjugates.icnn).parameters.items() if name != 'block_major'}


def get_config(dataset: str = 'miniimagenet') -> ml_collections.ConfigDict:
  """The DESIGN.md §2 defaults for ``dataset`` (see the module docstring for each field)."""
  c = ml_collections.ConfigDict()
  c.name = dataset
  c.dataset = dataset
  c.data_dir = default_data_dir(dataset)
  c.image_size = config_dict.placeholder(int)
  c.cache_dir = ''

  c.n_way = 5
  c.shot = 1
  c.query = 15
  c.eval_query = 15

  c.algorithm = 'metamida'
  c.first_order = False
  c.model = 'conv4'
  c.filters = 64
  c.resnet_widths = (64, 160, 320, 640)
  c.mlp_hidden = (40, 40)

  c.inner_steps = 5
  c.eval_inner_steps = config_dict.placeholder(int)
  c.inner_lr = 0.01
  c.meta_batch = 4
  c.num_steps = 60000

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4,
      decay_every=20000, decay_factor=0.1, clip_norm=0.0))

  c.eval_every = 2000
  c.val_tasks = 1000
  c.val_curve = False
  c.test_tasks = 1000
  c.eval_batch = 0
  c.eval_checkpoint = 'best'
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.seed = 0

  c.icnn = ml_collections.ConfigDict(icnn_defaults())
  c.strategy = ml_collections.ConfigDict(dict(tasks='auto', unroll=0, remat=False,
                                             map_remat='auto', conv='mirrormeta',
                                             layout='auto', icnn_block_major=True,
                                             icnn_map='auto'))
  c.num_devices = 1
  c.cpu_devices = 1
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int), auto=False))
  c.progress = True
  c.retain_freed_memory = True
  c.low_memory_schedule = False
  c.threaded_convolutions = False
  c.synchronous_dispatch = True
  c.compile_ahead = config_dict.placeholder(bool)
  return c


def omniglot(n_way: int, shot: int) -> ml_collections.ConfigDict:
  """Omniglot (Vinyals split, 28x28, rotations as classes) with the authors' Adam."""
  c = get_config('omniglot')
  c.n_way, c.shot = n_way, shot
  c.optimizer.name = 'adam'
  c.optimizer.weight_decay = 0.0
  return c
