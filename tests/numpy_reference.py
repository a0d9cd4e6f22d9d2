"""An independent NumPy (float64) HM-LSTM, written from decisions.md §1-3, not from the JAX code.

Layer norm follows the parameters: per term (``ln_U``, ``ln_U_top``, ``ln_W``) or of the
gated sum (``ln_s``); c inside the tanh when ``ln_c`` is there.

For binary boundaries it applies the operation table with explicit if/else per batch
element; for the soft variant it uses the blend of decisions.md §2. Used only by the tests.
"""
import numpy as np

EPS = 1e-5


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def hard_sigm(x, a):
  return np.maximum(0.0, np.minimum(1.0, (a * x + 1.0) / 2.0))


def ln(x, p):
  mu = x.mean(-1, keepdims=True)
  sd = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)
  return (x - mu) / sd * p["scale"] + p["bias"]


def term(h, w, ln_params, d):
  """One of W h, U h, U_top h, normalised by :func:`normalise` (per-term layer norm)."""
  return normalise(h @ w, ln_params, d)


def normalise(out, ln_params, d):
  """Layer norm over the 4d gate rows. The ž row is left untouched, or, when the layer-norm
  parameters have a ž entry too, standardised with the gate rows' mean and deviation and
  scaled by its own gain and shifted by its own bias. ``None``: no layer norm."""
  if ln_params is None:
    return out
  gates = out[:4 * d]
  if len(ln_params["scale"]) == 4 * d:
    return np.concatenate([ln(gates, ln_params), out[4 * d:]])
  mu = gates.mean()
  sd = np.sqrt(((gates - mu) ** 2).mean() + EPS)
  z_row = (out[4 * d:] - mu) / sd * ln_params["scale"][4 * d:] + ln_params["bias"][4 * d:]
  return np.concatenate([ln(gates, {k: v[:4 * d] for k, v in ln_params.items()}), z_row])


def run(params, xs, slope, variant, uniforms=None, init=None):
  """Runs the HM-LSTM on one sequence.

  Args:
    params: the per-layer dicts (converted to float64 NumPy).
    xs: (T, B, D) inputs.
    slope: a.
    variant: 'step', 'sample' (needs ``uniforms`` (T, L-1, B)) or 'soft'.
    init: optional per-layer (h, c, z) with z of shape (B,).

  Returns:
    hs, cs: lists per layer of (T, B, d); zs: list per layer of (T, B); ops: list per
    layer of (T, B) strings ('FLUSH', 'UPDATE', 'COPY'; None for soft); min_margin: the
    smallest |ž − threshold| seen (how far from a boundary flip the run was).
  """
  params = [{k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
                 {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in p.items()}
            for p in params]
  xs = np.asarray(xs, np.float64)
  T, B, _ = xs.shape
  L = len(params)
  sizes = [p["U"].shape[0] for p in params]
  if init is None:
    h = [np.zeros((B, d)) for d in sizes]
    c = [np.zeros((B, d)) for d in sizes]
    z = [np.zeros(B) for _ in sizes]
  else:
    h = [np.array(s[0], np.float64) for s in init]
    c = [np.array(s[1], np.float64) for s in init]
    z = [np.array(s[2], np.float64).reshape(B) for s in init]
  hs = [np.zeros((T, B, d)) for d in sizes]
  cs = [np.zeros((T, B, d)) for d in sizes]
  zs = [np.zeros((T, B)) for _ in sizes]
  ops = [np.full((T, B), None, dtype=object) for _ in sizes]
  margin = np.inf
  for t in range(T):
    new_h, new_c, new_z = [], [], []
    for l in range(L):
      p, d = params[l], sizes[l]
      last = l == L - 1
      for b in range(B):
        h_below = xs[t, b] if l == 0 else new_h[l - 1][b]
        z_below = 1.0 if l == 0 else new_z[l - 1][b]
        z_prev = z[l][b]
        s = term(h[l][b], p["U"], p.get("ln_U"), d)                      # Eq. 5, never gated
        if not last:
          s = s + z_prev * term(h[l + 1][b], p["U_top"], p.get("ln_U_top"), d)  # Eq. 6
        s = s + z_below * term(h_below, p["W"], p.get("ln_W"), d)        # Eq. 7
        if "ln_s" in p:  # layer norm of the gated sum of the three (ln_placement='sum')
          s = normalise(s, p["ln_s"], d)
        s = s + p["b"]
        f, i, o = sigmoid(s[:d]), sigmoid(s[d:2 * d]), sigmoid(s[2 * d:3 * d])
        g = np.tanh(s[3 * d:4 * d])
        squash = (lambda cc: np.tanh(ln(cc, p["ln_c"]))) if "ln_c" in p else np.tanh
        if variant == "soft":
          flush, update, copy = z_prev, (1 - z_prev) * z_below, (1 - z_prev) * (1 - z_below)
          c_new = flush * i * g + update * (f * c[l][b] + i * g) + copy * c[l][b]
          h_new = (flush + update) * o * squash(c_new) + copy * h[l][b]
          z_new = 0.0 if last else (1 - copy) * hard_sigm(s[4 * d], slope) + copy * z_prev
        else:
          if z_prev == 1:
            op = "FLUSH"
            c_new = i * g
          elif z_below == 1:
            op = "UPDATE"
            c_new = f * c[l][b] + i * g
          else:
            op = "COPY"
            c_new = c[l][b].copy()
          ops[l][t, b] = op
          if op == "COPY":
            h_new, z_new = h[l][b].copy(), z_prev
          else:
            h_new = o * squash(c_new)
            if last:
              z_new = 0.0
            else:
              z_tilde = hard_sigm(s[4 * d], slope)
              threshold = 0.5 if variant == "step" else uniforms[t, l, b]
              margin = min(margin, abs(z_tilde - threshold))
              z_new = 1.0 if z_tilde > threshold else 0.0
        hs[l][t, b], cs[l][t, b], zs[l][t, b] = h_new, c_new, z_new
      new_h.append(hs[l][t])
      new_c.append(cs[l][t])
      new_z.append(zs[l][t])
    h, c, z = new_h, new_c, new_z
  return hs, cs, zs, ops, margin
