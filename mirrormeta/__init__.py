"""mirrormeta: learnable mirror descent for gradient-based meta-learning in JAX.

    import mirrormeta as mm
    conj = mm.conjugates.icnn()                       # or euclidean(), diagonal(), kronecker()
    theta_h = conj.init(key, params)
    phi = mm.primal_map(conj.apply, theta_h, z)       # ∇_z h*(z; θ_h)
    z = mm.mirror_step(conj.apply, theta_h, z, grads, lr)
    phi_K, info = mm.adapt(conj.apply, theta_h, z0, loss_fn, batch, steps=K, lr=alpha)
"""
from mirrormeta import conjugates, models, native, runtime
from mirrormeta.core import AdaptInfo, adapt, mirror_step, primal_map
from mirrormeta.errors import MirrormetaError
from mirrormeta.meta import (MetaParams, MetaStep, Strategy, TrainState, default_strategy,
                             init_meta_params, make_meta_step, meta_loss)

__all__ = [
    'AdaptInfo', 'MetaParams', 'MetaStep', 'MirrormetaError', 'Strategy', 'TrainState',
    'adapt', 'conjugates', 'default_strategy', 'init_meta_params', 'make_meta_step',
    'meta_loss', 'mirror_step', 'models', 'native', 'primal_map', 'runtime',
]
