"""End-to-end fine-tuning of an ImageNet network (``mlsp finetune``), the systems MLSP is
measured against (docs/finetune.md): NIMA (a 10-way softmax over the vote distribution, EMD loss),
a regression head (MSE) and the fine-tuned 2-class classifiers (cross-entropy, ``--delta``), on
the backbones of :data:`heads.finetune.nets.NETS`; and ``mlsp compare``, the test metrics of
runs side by side on one test split.

Modules: :mod:`.nets` (the backbones, their preprocessing and blocks), :mod:`.config`
(:class:`FinetuneConfig`, every option and its default), :mod:`.images` (the labelled images,
their splits and the streaming batches), :mod:`.model` (backbone + head, the parts each phase
trains), :mod:`.checkpoint` (a checkpoint per epoch, checked by hash), :mod:`.loop` (the two
phases, early stopping, resume), :mod:`.metrics` (the binary metrics and AUC), :mod:`.scoring`
(score, evaluate and export a fine-tuned run), :mod:`.compare` (``mlsp compare`` and its page).
"""
