"""Running Zennit's composites the way the comparison tests need."""

import torch
import zennit.canonizers as zcan
from zennit import composites as zc
from zennit.attribution import Gradient

ZENNIT_COMPOSITES = {
    "epsilon_plus": zc.EpsilonPlus,
    "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
    "epsilon_plus_flat": zc.EpsilonPlusFlat,
    "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat,
    "epsilon_gamma_box": zc.EpsilonGammaBox,
    "excitation_backprop": zc.ExcitationBackprop,
}


class _ExactMerge:
    """Zennit's merge leaves each merged batch norm computing x / sqrt(1 + eps) (running_var is
    reset to 1 but eps stays), a 5e-6 scale per layer that fastlrp's fold does not have. While
    active, this sets eps of merged batch norms to 0 so both compute the original model."""

    def __enter__(self):
        self.original = zcan.MergeBatchNorm.__dict__["merge_batch_norm"]
        self.changed = []
        merge = self.original.__func__

        def exact(modules, batch_norm):
            merge(modules, batch_norm)
            self.changed.append((batch_norm, batch_norm.eps))
            batch_norm.eps = 0.0

        zcan.MergeBatchNorm.merge_batch_norm = staticmethod(exact)
        return self

    def __exit__(self, *exc):
        zcan.MergeBatchNorm.merge_batch_norm = self.original
        for batch_norm, eps in self.changed:
            batch_norm.eps = eps


def zennit_relevance(model, x, composite, target, canonizers=(), **options):
    """Zennit's relevance starting from the target logit. Zennit restores the model when its
    context ends (the tests check the state afterwards), so no copy of the model is needed."""
    comp = ZENNIT_COMPOSITES[composite](canonizers=list(canonizers), **options)
    with _ExactMerge(), Gradient(model=model, composite=comp) as attributor:
        output = model(x)
        onehot = torch.nn.functional.one_hot(target, output.shape[1]).to(x)
        _, relevance = attributor(x, lambda out: out * onehot)
    return relevance


def densenet_canonizer(model):
    """Zennit's SequentialMergeBatchNorm fails on DenseNet (it pairs the last conv with norm5 of a
    different width), so name the pairs that really are conv -> batch norm for its NamedMergeBatchNorm."""
    from fastlrp.apps.benchmark.providers import densenet_batchnorm_pairs
    return zcan.NamedMergeBatchNorm(densenet_batchnorm_pairs(model))
