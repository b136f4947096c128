"""sagan_jax: Self-Attention GAN (Zhang et al., 2019) in JAX/Flax."""

import os

# TensorFlow (tf.data, TensorBoard writers) is chatty at start-up; keep its C++ logs to errors.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = "0.1.0"
