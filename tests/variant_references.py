"""Float64 references for batch renormalization, ghost batch norm and masked statistics, written
from the equations of issue 19 with plain tensor ops (loops, boolean indexing), independent of
torch_bn's code. Differentiable by autograd: r and d of batch renormalization are detached,
as the paper's gradient treats them as constants."""
import torch


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _ch(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _affine(y, w, b):
    if w is not None:
        y = y * _ch(w, y)
    if b is not None:
        y = y + _ch(b, y)
    return y


def bn_reference(x, w, b, eps):
    """Plain batch norm: mean and biased variance per channel."""
    mu = x.mean(_dims(x))
    var = x.var(_dims(x), correction=0)
    return _affine((x - _ch(mu, x)) / torch.sqrt(_ch(var, x) + eps), w, b)


def renorm_reference(x, w, b, running_mean, running_var, eps, rmax, dmax, momentum=0.1):
    """y, r, d, new running mean and variance of one training step of batch renormalization."""
    mu = x.mean(_dims(x))
    var = x.var(_dims(x), correction=0)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mu - running_mean) / sigma, -dmax, dmax).detach()
    y = _affine((x - _ch(mu, x)) / _ch(sigma_b, x) * _ch(r, x) + _ch(d, x), w, b)
    m = x.numel() // x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mu.detach()
    new_var = (1 - momentum) * running_var + momentum * var.detach() * m / (m - 1)
    return y, r, d, new_mean, new_var


def ghost_reference(x, w, b, eps, virtual_batch_size, running_mean=None, running_var=None, momentum=0.1):
    """y and new running statistics of ghost batch norm: a Python loop over the chunks."""
    ys, means, variances = [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        chunk = x[start:start + virtual_batch_size]
        ys.append(bn_reference(chunk, None, None, eps))
        means.append(chunk.mean(_dims(chunk)).detach())
        variances.append(chunk.var(_dims(chunk), correction=1).detach())
    y = _affine(torch.cat(ys), w, b)
    if running_mean is None:
        return y, None, None
    new_mean = (1 - momentum) * running_mean + momentum * torch.stack(means).mean(0)
    new_var = (1 - momentum) * running_var + momentum * torch.stack(variances).mean(0)
    return y, new_mean, new_var


def masked_reference(x, w, b, mask, eps, running_mean=None, running_var=None, momentum=0.1):
    """y and new running statistics of masked batch norm: the counted values picked out by
    boolean indexing, (K, C), and every position normalized with their statistics."""
    counted = x.movedim(1, -1)[mask]  # (K, C)
    mu = counted.mean(0)
    var = counted.var(0, correction=0)
    y = _affine((x - _ch(mu, x)) / torch.sqrt(_ch(var, x) + eps), w, b)
    if running_mean is None:
        return y, None, None
    new_mean = (1 - momentum) * running_mean + momentum * mu.detach()
    new_var = (1 - momentum) * running_var + momentum * counted.var(0, correction=1).detach()
    return y, new_mean, new_var


def ghost_chunk_stats(x, virtual_batch_size):
    """Each chunk's mean and biased variance per channel, (chunks, C): a Python loop over the chunks."""
    chunks = [x[start:start + virtual_batch_size] for start in range(0, x.shape[0], virtual_batch_size)]
    return (torch.stack([c.mean(_dims(c)) for c in chunks]),
            torch.stack([c.var(_dims(c), correction=0) for c in chunks]))


def assert_matches_reference(record, name, y, y_ref, running, running_ref, inputs, dy, *, atol_y=1e-12):
    """y, the new running statistics and the gradients of y (dy against inputs) equal the
    reference's in float64; record(name + " y" / " grad" / " running", a, b) logs each error."""
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=atol_y)
    torch.testing.assert_close(running, running_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
        record(f"{name} grad", g, r)
    record(f"{name} y", y, y_ref)
    record(f"{name} running", torch.cat(running), torch.cat(running_ref))
