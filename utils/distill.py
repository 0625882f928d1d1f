"""Knowledge distillation from a frozen real-valued teacher."""
import torch.nn.functional as F
import torchvision

from models.checkpoint import extract_state_dict, read_checkpoint

from .data import require_classes
from .errors import UserError


def distillation_loss(student_logits, teacher_logits):
    """Cross-entropy of the student against the teacher's softmax, averaged over the batch.

    ``loss = mean_b( -sum_c softmax(teacher)_bc * log_softmax(student)_bc )`` at temperature 1,
    computed in float32. The teacher's logits must not require gradients.
    """
    if teacher_logits.requires_grad:
        raise ValueError("teacher logits must not require gradients")
    teacher_probs = F.softmax(teacher_logits.float(), dim=1)
    return -(teacher_probs * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


def build_teacher(arch, num_classes, weights_path=None, classes=None, folder="the data"):
    """A frozen torchvision classifier in eval mode.

    Args:
        arch: torchvision model name, e.g. ``resnet34``.
        num_classes: classes of the dataset; the teacher must predict exactly these.
        weights_path: a state_dict file (or a dict holding one under ``state_dict``) for ``arch``
            with ``num_classes`` outputs. Without it, torchvision's default ImageNet weights are
            used (downloaded once into torch's cache), which requires 1000 classes.
        classes: the dataset's class names in label order, which a weights file that records its
            own (tools.train_teacher's) must list the same (``check_teacher_classes``).
        folder: where the dataset's classes were read, for the error message.
    """
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise UserError(f"unknown teacher '{arch}': use a torchvision classification model name "
                        f"such as resnet34") from None
    if weights_path is None:
        if num_classes != 1000:
            raise UserError(f"the data has {num_classes} classes but the pretrained '{arch}' "
                            f"teacher predicts 1000 ImageNet classes: train a teacher on your data "
                            f"(python -m tools.train_teacher) and pass --teacher_weights")
        try:
            teacher = builder(weights="DEFAULT")
        except Exception as e:  # urllib/SSL/socket errors differ by platform
            raise UserError(f"could not get the pretrained weights of '{arch}' ({type(e).__name__}: "
                            f"{str(e)[:120]}); offline, download them elsewhere and pass "
                            f"--teacher_weights PATH") from None
    else:
        teacher = builder(weights=None, num_classes=num_classes)
        checkpoint = read_checkpoint(weights_path)
        state_dict = extract_state_dict(checkpoint, weights_path)
        expected = teacher.state_dict()
        outputs = _output_classes(state_dict)
        if outputs is not None and outputs != num_classes:
            raise UserError(f"teacher weights {weights_path} predict {outputs} classes but the data "
                            f"has {num_classes}: use a teacher trained on this dataset")
        if classes is not None:
            check_teacher_classes(checkpoint, weights_path, classes, folder)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise UserError(f"teacher weights {weights_path} are not a '{arch}' state_dict "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass --teacher "
                            f"with the architecture they were trained as")
        try:
            teacher.load_state_dict(state_dict)
        except RuntimeError as e:
            raise UserError(f"teacher weights {weights_path} do not fit '{arch}': "
                            f"{str(e).splitlines()[-1].strip()}") from None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_teacher_classes(checkpoint, path, classes, folder):
    """A UserError where the teacher file ``checkpoint`` (read from ``path``) records class names
    (tools.train_teacher writes them) other than ``classes``, those of ``folder`` in label order:
    the student would learn the teacher's class k as its own class k. A bare state_dict records
    none and is not checked."""
    if isinstance(checkpoint.get("classes"), (list, tuple)):
        require_classes(checkpoint["classes"], classes, folder, f"the teacher {path}",
                        "pass --teacher_weights of a teacher trained on this data (python -m "
                        "tools.train_teacher), or the --data it was trained on")


def _output_classes(state_dict):
    """Rows of the last 2-D weight, the classifier of torchvision's models; None if there is none."""
    matrices = [v for v in state_dict.values() if v.dim() == 2]
    return matrices[-1].shape[0] if matrices else None
