"""What the benchmark compares: the models (torchvision, random weights), the composites in
fastlrp's and Zennit's spelling, and one provider per library (fastlrp with a backend, Zennit,
Captum) plus the forward pass and the plain input gradient as yardsticks. A provider is a
context manager that sets up once and yields ``run(x, target) -> relevance``.
"""
import contextlib
import copy

import torch


def _torchvision():
    from ...extras import require
    return require("torchvision", "bench")


# fastlrp preset name -> (Zennit composite class name, rule options both take)
COMPOSITES = {
    "epsilon_plus": ("EpsilonPlus", {}),
    "epsilon_plus_flat": ("EpsilonPlusFlat", {}),
    "epsilon_alpha2_beta1": ("EpsilonAlpha2Beta1", {}),
    "epsilon_alpha2_beta1_flat": ("EpsilonAlpha2Beta1Flat", {}),
    "epsilon_gamma_box": ("EpsilonGammaBox", {"low": -3.0, "high": 3.0}),
    "excitation_backprop": ("ExcitationBackprop", {}),
}


def _video_block_canonizer():
    """Zennit's ResNetBasicBlockCanonizer, for torchvision's video BasicBlock.

    Zennit ships none: without it the in-place `out += residual` has no Sum module, takes
    the plain gradient, and every block doubles the relevance, so Zennit would compute
    something else than the composite's definition (Sum -> Norm) on r3d_18.
    """
    from torchvision.models.video.resnet import BasicBlock
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(self.canonizer_sum(torch.stack([residual, out], dim=-1)))

    return AttributeCanonizer(lambda name, module: {"forward": forward.__get__(module), "canonizer_sum": Sum()}
                              if isinstance(module, BasicBlock) else None)


def densenet_batchnorm_pairs(model):
    """The conv -> batch norm pairs of a torchvision DenseNet: conv0 -> norm0 and, in every dense
    layer, conv1 -> norm2 (the other norms follow a concatenation). Zennit's
    SequentialMergeBatchNorm cannot be used: it pairs the last conv with norm5 and crashes."""
    pairs = [(["features.conv0"], "features.norm0")]
    pairs += [([name], name[: -len("conv1")] + "norm2") for name, _ in model.named_modules()
              if "denselayer" in name and name.endswith(".conv1")]
    return pairs


def _zennit_canonizers(model_name, model):
    from zennit.canonizers import CompositeCanonizer, NamedMergeBatchNorm, SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    if model_name == "r3d_18":  # its BatchNorms follow their convs inside nn.Sequential
        return CompositeCanonizer([SequentialMergeBatchNorm(), _video_block_canonizer()])
    if model_name == "densenet121":
        return NamedMergeBatchNorm(densenet_batchnorm_pairs(model))
    return {"vgg16": VGGCanonizer, "resnet50": ResNetCanonizer}[model_name]()


MODELS = {
    "vgg16": lambda: _torchvision().models.vgg16(weights=None),
    "resnet50": lambda: _torchvision().models.resnet50(weights=None),
    "densenet121": lambda: _torchvision().models.densenet121(weights=None),
    "r3d_18": lambda: _torchvision().models.video.r3d_18(weights=None),
}
VIDEO_MODELS = {"r3d_18"}
# DenseNet calls F.relu and F.adaptive_avg_pool2d; Zennit's hooks see only modules, so these
# keep their gradient there. The same choice for fastlrp keeps the two computing one thing.
FASTLRP_OPTIONS = {"densenet121": {"functional_rules": False}}


# Rows whose provider runs but computes something else than the composite's definition;
# their times are comparable work, their relevances are not.
CAVEATS = {
    ("captum", "resnet50"): "Captum has no rule for the residual sums (plain gradient there)",
}


class Unsupported(Exception):
    """The provider cannot express this model or composite; recorded, not an error."""


def frozen_copy(model):
    # Every provider gets its own copy (Zennit canonizers and Captum rules modify the
    # model while attached) with parameters frozen, so no provider pays for weight grads.
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    return model


def one_hot_logit(output, target):
    return output * torch.nn.functional.one_hot(target, output.shape[1]).to(output.dtype)


@contextlib.contextmanager
def forward_provider(model, **_):
    def run(x, target):
        with torch.no_grad():
            return model(x)
    yield run


@contextlib.contextmanager
def gradient_provider(model, **_):
    def run(x, target):
        x = x.detach().requires_grad_()
        logit = model(x).gather(1, target[:, None]).sum()
        return torch.autograd.grad(logit, x)[0]
    yield run


@contextlib.contextmanager
def fastlrp_provider(model, composite, backend, model_name=None, **_):
    """``backend`` is a backend name, optionally with ``+save_memory`` (e.g. ``native+save_memory``)."""
    import fastlrp
    backend, _, flag = backend.partition("+")
    if flag not in ("", "save_memory"):
        raise ValueError(f"unknown fastlrp provider option {flag!r}; known: save_memory")
    explainer = fastlrp.LRP(model, composite=composite, backend=backend, save_memory=flag == "save_memory",
                            **COMPOSITES[composite][1], **FASTLRP_OPTIONS.get(model_name, {}))
    yield explainer


@contextlib.contextmanager
def zennit_provider(model, composite, model_name, **_):
    import zennit.composites
    from zennit.attribution import Gradient
    cls_name, options = COMPOSITES[composite]
    zcomposite = getattr(zennit.composites, cls_name)(canonizers=[_zennit_canonizers(model_name, model)], **options)
    # Hooks and canonizers are attached once, outside the timed calls, as a user would.
    with Gradient(model=model, composite=zcomposite) as attributor:
        yield lambda x, target: attributor(x, attr_output=lambda out: one_hot_logit(out, target))[1]


def _captum_rules(composite):
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
    # Captum has Epsilon, Gamma, Alpha1Beta0 (= ZPlus) and Identity only: no ZBox, no
    # AlphaBeta(2, 1), no Flat. It merges no BatchNorm and its MaxPool uses Epsilon, so even
    # where it runs its numbers are close to, not equal to, Zennit's.
    if composite == "epsilon_plus":
        return lambda m: (Alpha1_Beta0_Rule() if isinstance(m, torch.nn.modules.conv._ConvNd)
                          else EpsilonRule(1e-6) if isinstance(m, torch.nn.Linear) else None)
    if composite == "excitation_backprop":
        return lambda m: (Alpha1_Beta0_Rule()
                          if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) else None)
    raise Unsupported(f"Captum has no rules for {composite} (it lacks ZBox, AlphaBeta(2,1) and Flat)")


@contextlib.contextmanager
def captum_provider(model, composite, **_):
    from captum.attr import LRP
    rule_for = _captum_rules(composite)
    lrp = LRP(model)

    def run(x, target):
        # Captum deletes every module's `rule` (the user's too) at the end of attribute(),
        # so later calls would silently fall back to its default Epsilon: set them each call.
        for module in model.modules():
            rule = rule_for(module)
            if rule is not None:
                module.rule = rule
        return lrp.attribute(x.detach().requires_grad_(), target=target)
    # Captum also attaches its hooks inside every attribute() call: part of its call time.
    yield run


def classify(provider, exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if isinstance(exc, Unsupported):
        return "unsupported", str(exc)
    if provider == "captum" and ("no rule defined" in text or "not supported" in text.lower()):
        return "unsupported", text
    if isinstance(exc, ImportError):  # zennit or captum not installed: a gap, not a failure
        return "unavailable", f"{text}; pip install \"fastlrp[bench]\""
    return "error", text



def fastlrp_backends(device="cpu"):
    try:
        import fastlrp
        fastlrp.LRP  # the engine may not exist yet
        return [f"fastlrp:{b}" for b in fastlrp.available_backends(device)], ""
    except Exception as exc:
        return [], f"fastlrp not usable: {type(exc).__name__}: {exc}"

