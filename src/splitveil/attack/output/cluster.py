"""`cluster`: a cloud that knows nothing of the model groups the features it receives by salt.

The minimal-knowledge cloud: no edge weights, no labels, no auxiliary data; it holds only the cut features of the
requests it serves and the public number of salts S. Each salt adds its own term to what the client's blocks compute
(the salt layer's learned maps), so requests under the same salt may sit together in feature space. The attack
centres the features, reduces them with PCA and clusters them into S groups (k-means, or a Gaussian mixture). Its
answer names each request's group, not its salt: group 3 may be salt 7. Scored with the best one-to-one naming of
groups by salts (`metrics.clustering.matched_accuracy`), it says whether the requests' salts can be told apart
without the public model; naming the groups then takes one labelled request per salt, or the public model.
"""

from __future__ import annotations

import torch

from splitveil.attack.base import ThreatModel
from splitveil.attack.output.base import OUTPUT_ATTACKS, OutputAttack
from splitveil.core.errors import ConfigError

METHODS = ("kmeans", "gmm")


def reduce_features(features: torch.Tensor, *, components: int, seed: int = 0) -> torch.Tensor:
    """Pure: features [N, ...] -> their first `components` principal components [N, k] (centred, randomized SVD;
    k = min(components, N - 1, D))."""
    from sklearn.decomposition import PCA

    flat = features.flatten(1).double().numpy()
    k = max(1, min(components, flat.shape[0] - 1, flat.shape[1]))
    return torch.from_numpy(PCA(n_components=k, svd_solver="randomized", random_state=seed).fit_transform(flat))


def cluster_points(points: torch.Tensor, groups: int, *, method: str = "kmeans", seed: int = 0,
                   restarts: int = 10) -> torch.Tensor:
    """Pure: points [N, k] -> a group per point [N] int64 in [0, groups), the best of `restarts` initialisations."""
    array = points.numpy()
    if method == "kmeans":
        from sklearn.cluster import KMeans

        assigned = KMeans(n_clusters=groups, n_init=restarts, random_state=seed).fit_predict(array)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        assigned = GaussianMixture(n_components=groups, covariance_type="diag", n_init=max(1, restarts // 3),
                                   random_state=seed, reg_covar=1e-4).fit_predict(array)
    else:
        raise ConfigError(f"unknown clustering method {method!r}; known: {', '.join(METHODS)}")
    return torch.as_tensor(assigned, dtype=torch.int64)


@OUTPUT_ATTACKS.register("cluster")
class SaltClusters(OutputAttack):
    """Args:
        method: kmeans or gmm (a Gaussian mixture with diagonal covariances).
        components: principal components kept (None: 2 S).
        restarts: initialisations of the clustering (the best is kept).
    """

    name = "cluster"
    threat_model = ThreatModel(observes="uplink", knows_defence=True,
                               description="holds only the cut features of the requests it serves and the number of "
                                           "salts S (no edge weights, no labels, no auxiliary data); reduces the "
                                           "features with PCA and clusters them into S groups, one per salt it hopes; "
                                           "scored with the best naming of groups by salts")

    def __init__(self, target, *, method: str = "kmeans", components: int | None = None, restarts: int = 10,
                 seed: int = 0, quiet: bool = True):
        super().__init__(target, seed=seed, quiet=quiet)
        if method not in METHODS:
            raise ConfigError(f"unknown clustering method {method!r}; known: {', '.join(METHODS)}")
        if components is not None and components < 1:
            raise ConfigError(f"components must be at least 1, got {components}")
        self.method, self.restarts = method, restarts
        self.components = components or 2 * self.target.salt_values

    @torch.no_grad()
    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """A group per request [N] (groups stand for salts up to renaming)."""
        points = reduce_features(features, components=self.components, seed=self.seed)
        return cluster_points(points, self.target.salt_values, method=self.method, seed=self.seed,
                              restarts=self.restarts)

    def describe(self) -> dict:
        return {**super().describe(), "method": self.method, "components": self.components}
