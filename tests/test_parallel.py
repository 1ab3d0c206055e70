"""Tasks across devices and processes give the same meta-training as one device."""
import os
import socket
import subprocess
import sys
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
