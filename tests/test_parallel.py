"""Tasks across devices and processes give the same meta-training as one device: the
library's sharded meta-step (tests/parallel_worker.py), and the runner end to end on the smoke
config (several processes over loopback; a checkpoint resumed under another device count).
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name('parallel_worker.py')


def run_workers(tmp_path, name, devices_per_process, processes=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  out = tmp_path / f'{name}.npz'
  if processes == 1:
    cmds = [[sys.executable, str(WORKER), str(out), str(devices_per_process)]]
  else:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    cmds = [[sys.executable, str(WORKER), str(out), '0', f'127.0.0.1:{port}', str(processes), str(i)]
            for i in range(processes)]
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for c in cmds]
  for p in procs:
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-3000:]
  return dict(np.load(out))


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return run_workers(tmp_path_factory.mktemp('one'), 'one', 1)


def assert_same_run(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_eight_fake_devices_match_one(one_device, tmp_path):
  assert_same_run(run_workers(tmp_path, 'eight', 8), one_device)


def test_two_processes_match_one(one_device, tmp_path):
  assert_same_run(run_workers(tmp_path, 'two', 4, processes=2), one_device)


# --- the runner (python -m experiments.run) across devices, processes and restarts ---------
# The smoke config made tiny: 8 tasks per step (1 per device on 8 devices), 4 steps. SGD
# meta-optimizer: Adam divides a gradient by its own running size, so roundoff-sized
# differences in the cross-device reduction order would become full-size steps; with SGD
# they stay roundoff-sized (measured: ≤ 2e-6 after 4 steps), so 1e-5 is a real check.
REPO = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 4


def smoke_args(omniglot_dir, workdir, steps=SMOKE_STEPS):
  return ['--config=smoke', f'--config.data_dir={omniglot_dir}', f'--workdir={workdir}',
          '--config.optimizer.name=sgd', '--config.meta_batch=8', f'--config.num_steps={steps}',
          '--config.eval_every=2', '--config.checkpoint_every=2', '--config.log_every=2',
          '--config.val_tasks=4', '--config.test_tasks=8', '--config.eval_query=5',
          '--config.progress=False']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_cli(args, devices=1, processes=1, timeout=600):
  """``python -m experiments.run ARGS`` in ``processes`` processes of ``devices`` fake CPU
  devices each (None: as many as the runner makes), connected over loopback by the
  multi-host flags (config.distributed).

  Returns each process's output. A process that fails stops the others (a lone process
  would wait minutes for its peers).
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(REPO / '.jax_cache'),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  if devices is None:  # the runner splits the host itself (config.cpu_devices)
    env.pop('XLA_FLAGS')
  args = list(args) + (['--config.num_devices=0'] if (devices or 1) > 1 or processes > 1 else [])
  cmds = [args]
  if processes > 1:
    address = f'127.0.0.1:{free_port()}'
    cmds = [args + [f'--config.distributed.coordinator_address={address}',
                    f'--config.distributed.num_processes={processes}',
                    f'--config.distributed.process_id={i}'] for i in range(processes)]
  logs = [tempfile.TemporaryFile('w+') for _ in cmds]
  procs = [subprocess.Popen([sys.executable, '-m', 'experiments.run', *c], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
           for c, log in zip(cmds, logs)]

  def output(i):
    logs[i].seek(0)
    return logs[i].read()

  def failure(what):
    # Every process's status, error lines and tail: a crash's cause often shows in the
    # other process, or above a long thread dump.
    parts = [what]
    for i, p in enumerate(procs):
      text = output(i)
      errors = [line for line in text.splitlines() if re.search(
          r'Error|error:|FATAL|^F\d{4} |Check failed|[Tt]erminat|[Bb]arrier', line)]
      parts.append(f'--- process {i}: returncode {p.poll()}; error lines:\n'
                   + '\n'.join(errors[-15:]) + f'\n--- its tail:\n{text[-1500:]}')
    return '\n'.join(parts)
  try:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        assert p.poll() in (None, 0), failure(f'process {i} of {len(procs)} failed')
      assert time.monotonic() < deadline, failure('timed out')
      time.sleep(0.2)
    for i, p in enumerate(procs):
      assert p.returncode == 0, failure(f'process {i} of {len(procs)} failed')
    return [output(i) for i in range(len(procs))]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()


def final_state(workdir, step=None):
  """A latest checkpoint's TrainState as numpy arrays, whatever devices it was saved from."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  d = Path(workdir) / 'checkpoints' / 'latest'
  step = step or max(int(p.name) for p in d.iterdir() if p.name.isdigit())
  path = (d / str(step) / 'default').absolute()
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), meta)
  state = checkpointer.restore(path, target)
  checkpointer.close()
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_state(workdir, reference, step=SMOKE_STEPS):
  """θ, optimizer state and step counter of the checkpoints of ``step`` agree (≤ 1e-5)."""
  got, ref = final_state(workdir, step), final_state(reference, step)
  assert got[0] == ref[0] == step
  assert_same_run(got[1], ref[1])


def assert_same_training(workdir, reference):
  assert_same_state(workdir, reference)
  results, ref = (json.loads((Path(w) / 'results.json').read_text()) for w in (workdir, reference))
  assert results['checkpoint']['step'] == ref['checkpoint']['step']
  np.testing.assert_allclose(results['per_step']['loss'], ref['per_step']['loss'], rtol=1e-5)
  np.testing.assert_allclose(results['per_step']['accuracy'], ref['per_step']['accuracy'],
                             atol=1e-4)


@pytest.fixture(scope='module')
def smoke_one_device(omniglot_dir, tmp_path_factory):
  """The reference: 1 process, 1 device, SMOKE_STEPS steps (checkpoints of steps 2 and 4)."""
  workdir = tmp_path_factory.mktemp('smoke') / 'one_device'
  run_cli(smoke_args(omniglot_dir, workdir))
  return workdir


def test_two_processes_train_the_smoke_config_like_one_device(smoke_one_device, omniglot_dir,
                                                               tmp_path):
  """2 processes x 4 fake devices over loopback (the multi-host command, process ids as
  config flags) train the first half; 1 process on 1 device resumes their checkpoint."""
  half = SMOKE_STEPS // 2
  workdir = tmp_path / 'run'
  outputs = run_cli(smoke_args(omniglot_dir, workdir, steps=half), devices=4, processes=2)
  assert_same_state(workdir, smoke_one_device, half)
  assert json.loads((workdir / 'results.json').read_text())['devices'] == 8
  # Only process 0 writes: one TensorBoard file, one report, one summary line printed.
  assert len(list((workdir / 'tensorboard').iterdir())) == 1
  assert {p.name for p in workdir.iterdir()} == {p.name for p in smoke_one_device.iterdir()}
  assert 'smoke maml: test accuracy' in outputs[0]
  assert 'smoke maml: test accuracy' not in outputs[1]

  outputs = run_cli(smoke_args(omniglot_dir, workdir))  # 8 devices' checkpoint on 1 device
  assert f'resuming {workdir} from step {half}' in outputs[0]
  assert_same_training(workdir, smoke_one_device)


def test_one_device_checkpoint_resumes_on_eight_devices(smoke_one_device, omniglot_dir, tmp_path):
  half = SMOKE_STEPS // 2
  workdir = tmp_path / 'run'
  run_cli(smoke_args(omniglot_dir, workdir, steps=half))
  outputs = run_cli(smoke_args(omniglot_dir, workdir), devices=8)
  assert f'resuming {workdir} from step {half}' in outputs[0]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['devices'] == 8 and results['train']['resumed_from'] == half
  assert_same_training(workdir, smoke_one_device)


def test_cpu_devices_splits_the_host_and_trains_like_one_device(smoke_one_device, omniglot_dir,
                                                                tmp_path):
  """config.cpu_devices=2: the runner splits the host into 2 XLA:CPU devices itself (no
  XLA_FLAGS) and the meta-batch over them, with the default num_devices=1."""
  workdir = tmp_path / 'run'
  run_cli(smoke_args(omniglot_dir, workdir) + ['--config.cpu_devices=2'], devices=None)
  assert json.loads((workdir / 'results.json').read_text())['devices'] == 2
  assert_same_training(workdir, smoke_one_device)
