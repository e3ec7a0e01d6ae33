"""How far FUN-AD* synthetic anomaly patches are from real training patches, in the raw stored features.

Usage: ``python benchmarks/synthetic_nn_check.py CACHE`` (a labelled cache extracted with --synthetic).
Squared distance of each patch to its nearest neighbour among 60 real training images (the synthetic
images' base and texture images left out), for synthetic, real anomalous and normal test patches.
"""
import sys

import numpy as np
import torch
from funad import cache
from funad.pipelines.features import patch_labels
s = cache.open(sys.argv[1], 'r')
syn = s.indices('synthetic'); train = s.indices('train'); test = s.indices('test')
plan = s.attrs['synthetic']
rng = np.random.default_rng(0)
bank_ids = np.setdiff1d(rng.choice(train, 60, replace=False), plan['base_ids'] + plan['texture_ids'])
bank = torch.from_numpy(s.read_features(bank_ids, dtype='float32')).flatten(0, 1)
def nn(ids):
    q = torch.from_numpy(s.read_features(ids, dtype='float32'))
    return torch.cdist(q.flatten(0, 1), bank).min(1).values.pow(2).view(len(ids), -1).numpy()
lab_syn = patch_labels(s.read_masks(syn), s.grid).astype(bool)
d_syn = nn(syn)
labels = np.asarray(s.labels)[test]
anom = test[labels == 1][:15]; norm = test[labels == 0][:10]
d_anom, d_norm = nn(anom), nn(norm)
lab_anom = patch_labels(s.read_masks(anom), s.grid).astype(bool)
q = lambda a: f"median {np.median(a):.1f}, p90 {np.percentile(a, 90):.1f} (n={a.size})"
print("synthetic, inside mask :", q(d_syn[lab_syn]))
print("synthetic, outside mask:", q(d_syn[~lab_syn]))
print("real anomalies, inside mask :", q(d_anom[lab_anom]))
print("real anomalies, outside mask:", q(d_anom[~lab_anom]))
print("real normal test patches     :", q(d_norm.ravel()))
print("share of synthetic mask patches above the p99 of normal test patches:",
      f"{(d_syn[lab_syn] > np.percentile(d_norm, 99)).mean():.3f}",
      "; real anomaly mask patches:", f"{(d_anom[lab_anom] > np.percentile(d_norm, 99)).mean():.3f}")
print("per synthetic image, max patch distance:", np.round(d_syn.max(1), 1).tolist())
print("per normal test image, max patch distance:", np.round(d_norm.max(1), 1).tolist())
