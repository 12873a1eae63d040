"""The config schema: one dataclass per section, every default in one place.

A suite (what ``relkd run`` runs) trains or loads one teacher, then trains one student per method and
seed. In YAML::

    name: digits
    data: {name: digits, train_subset: 100, unlabeled: true}
    teacher: {model: lenet, args: {width: 32}, data: {train_subset: null, unlabeled: false}}
    student: {model: lenet, args: {width: 4}}
    train: {epochs: 30, optimizer: {name: sgd, lr: 0.05}, schedule: {name: cosine}}
    methods: [baseline, kd, rkd]          # built-in method configs, or a mapping of your own
    seeds: [0, 1, 2]

Two keys are consumed while loading and are not part of the schema: ``extends: base.yaml`` (start
from another file) and ``overrides: ["key.sub=value", ...]`` (applied like command-line overrides,
after the built-in methods are expanded). Sections that refine another one (``teacher.data``,
``teacher.train``, ``methods.<m>.train``) hold only the keys that differ; :mod:`relkd.config.load`
merges them onto the suite's before building these classes, so here they are complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "StageConfig",
    "SuiteConfig",
    "TeacherConfig",
    "TrainConfig",
]


@dataclass
class DataConfig:
    """Which dataset, which part of it is labelled, and how it is batched.

    Attributes:
        name: dataset registry name (``relkd list`` shows them).
        root: folder of the files; null searches the dataset's environment variables and defaults.
        train_subset: keep a seeded, class-balanced subset of this many labelled training images.
        unlabeled: make the rest of the training set an unlabelled transfer set for the
            distillation terms (needs ``train_subset``).
        transfer_size: keep a seeded random subset of this many transfer images (null: all of them;
            ignored without ``unlabeled``).
        subset_seed: seed of the labelled subset's and the transfer subset's choice; null uses the
            run's seed.
        batch_size: labelled images per step, over all processes: under ``torchrun`` each of the
            ``W`` processes takes ``batch_size / W`` (likewise ``transfer_batch_size``; both must be
            divisible by ``W``).
        transfer_batch_size: transfer images added to each step that has distillation terms; null is
            ``batch_size``.
        test_batch_size: images per evaluation batch.
        loader: ``auto`` (in-memory datasets held as tensors on the training device, augmented
            there in batches; folder datasets through a torch ``DataLoader``), ``tensor`` or
            ``dataloader`` (any dataset through a ``DataLoader``, e.g. to compare the two).
        num_workers: decoding processes of the ``DataLoader`` path.
        augment: the dataset's standard training augmentation.
        classes: keep only these classes (labels unchanged), in the training and test sets; null
            keeps every class.
        options: dataset-specific options, e.g. ``{image_size: 224}`` for ``imagefolder``.
    """

    name: str = "digits"
    root: str | None = None
    train_subset: int | None = None
    unlabeled: bool = False
    transfer_size: int | None = None
    subset_seed: int | None = None
    batch_size: int = 64
    transfer_batch_size: int | None = None
    test_batch_size: int = 256
    loader: str = "auto"
    num_workers: int = 0
    augment: bool = True
    classes: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The training recipe of one network.

    Attributes:
        epochs: passes over the training data (of the main stage, when a method has stages).
        optimizer: ``{name, **options}`` of a registered optimiser (``sgd``, ``adam``, ``adamw``).
        optimizers: optimisers of their own for some modules, ``{module path: {options}}``: their
            parameters leave the main optimiser; the options are merged over ``optimizer``'s (a
            different ``name`` starts from that optimiser's defaults), e.g.
            ``{steps.0.decoders: {name: adam, lr: 1.0e-3}}``. Each follows the stage's schedule.
        schedule: ``{name, **options}`` of a registered learning-rate schedule (``constant``,
            ``multistep``, ``cosine``, ``step``), stepped once per epoch.
        warmup_epochs: linear warm-up from 1% of the learning rate over this many epochs.
        ce_weight: weight of the cross-entropy on labelled images.
        clip_grad_norm: clip the gradient's total norm to this value (null: no clipping).
        clip_to_ce: clip the distillation terms' gradient of each parameter to the norm of its
            cross-entropy gradient, ``g = g_ce + g_kd * min(1, |g_ce| / |g_kd|)``, as the KD-SVD and
            MHGD authors do; parameters without a cross-entropy gradient (a loss's own) are not clipped.
        clip_to_ce_ramp: ``sigmoid`` scales that clipping norm by ``sigmoid(e)``, ``e`` the 0-based epoch
            within the stage (the authors' TensorFlow code: half the cross-entropy norm at the start);
            null clips to the full norm.
        batch_transform: ``{name, **options}`` of a registered transform applied to every training
            batch once, before any network sees it (``identity``).
        sync_bn: under ``torchrun``, BatchNorm layers of the trained modules normalise with the
            statistics of the global batch rather than each process's shard; null (default): on when
            there are several processes and a BatchNorm layer, off otherwise. One process: no effect.
        compile: compile the networks and the loss modules with :func:`relkd.compile`
            (``torch.compile``, shapes specialised; in place, so checkpoints keep their keys).
    """

    epochs: int = 10
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    )
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "constant"})
    warmup_epochs: int = 0
    ce_weight: float = 1.0
    clip_grad_norm: float | None = None
    clip_to_ce: bool = False
    clip_to_ce_ramp: str | None = None
    batch_transform: dict[str, Any] = field(default_factory=lambda: {"name": "identity"})
    sync_bn: bool | None = None
    compile: bool = False


@dataclass
class StageConfig:
    """One stage of a run: what is trained, with which terms, for how long.

    Attributes:
        name: label in logs and checkpoints.
        epochs: length; null takes the recipe's ``epochs``.
        terms: loss terms active in this stage, ``{term: {weight, call, network}}`` (a list of names
            keeps their weights); null uses every term of the method's ``losses``. ``call`` names the
            loss method to call instead of ``distill`` (e.g. ``pretrain_step``) and ``network`` the
            network whose features it gets alone (e.g. ``teacher``).
        ce_weight: cross-entropy weight; null takes the recipe's.
        trainable: modules optimised, as paths: a network (``student``), ``loss`` (every loss
            module) or a part (``loss.mhgd.heads``); null is every student and every loss.
        frozen: modules excluded from ``trainable`` and put in eval mode during this stage.
        optimizer, optimizers, schedule, warmup_epochs: this stage's, null for the recipe's.
        after: methods called when the stage ends, as paths (``loss.mhgd.freeze_heads``), whose
            arguments may name modules (``loss.lce.arcface.copy_to(student.fc)``); what they change
            must live in the module's ``state_dict`` so that resuming restores it.
        after_epoch: calls like ``after``, made at the end of every epoch of the stage, before the
            test evaluation (e.g. writing a loss's classifier into the network that is evaluated).
        step: this stage's step ``{name, **options}``; null takes the method's.
        batches: ``train`` (the training batches: augmented, with the transfer images when the
            stage distils) or ``labelled_once`` (the labelled training images once per epoch, in
            order, without augmentation: a pass that gathers statistics such as class centres).

    ``trainable`` and ``frozen`` paths may also name a network's modules up to a tap,
    ``student.until(stage2)``, between two taps, ``student.between(stage1, stage2)``, or after one,
    ``student.after(stage3)``; an empty
    ``trainable: []`` trains nothing (a pass that only gathers statistics).
    """

    name: str = "train"
    epochs: int | None = None
    terms: dict[str, dict[str, Any]] | list[str] | None = None
    ce_weight: float | None = None
    trainable: list[str] | None = None
    frozen: list[str] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    optimizers: dict[str, dict[str, Any]] | None = None
    schedule: dict[str, Any] | None = None
    warmup_epochs: int | None = None
    after: list[str] = field(default_factory=list)
    after_epoch: list[str] = field(default_factory=list)
    step: dict[str, Any] | None = None
    batches: str = "train"


@dataclass
class MethodConfig:
    """One distillation method: its networks, its loss terms, its step, its recipe and stages.

    Attributes:
        losses: ``{term: {loss, weight, taps, student, teacher, **loss options}}``. ``loss`` is the
            registered loss (default: the term's name), ``weight`` its weight (default 1), ``taps``
            overrides the features it reads (a list for both networks or ``{student: [...],
            teacher: [...]}``), ``student``/``teacher`` name the networks (default: the only ones).
            Other keys go to the loss's constructor.
        step: the registered step that makes one training update, ``{name, **options}``
            (``weighted_sum``: cross-entropy plus the weighted terms); ``relkd list steps``.
        students: the method's trainable networks, ``{name: suite student name or {model, args}}``;
            null takes the suite's students as they are. Peers: ``{peer1: student, peer2: student}``.
        teachers: the method's frozen networks: null is every teacher the suite declares, a list
            names some of them, a mapping ``{name: suite teacher name or a teacher config}`` defines
            the method's own (``{self: {like: student}}``: the student's architecture trained first).
        deploy: the students that are the method's result (tested, tabled); null lets the step
            choose (every student by default).
        evaluate: evaluators run once on each deployed network at the end, ``{name: {options}}``
            (``relkd list evaluators``); their numbers are extra columns of the results table.
        stages: the stages in order; null is one stage with every term.
        train: the recipe (the suite's ``train`` with this method's changes merged in).
        description: one line shown by ``relkd list``.
        modality: ``image`` or ``text``: the data the method is made for; ``methods: all`` runs the
            built-in methods of images (text methods are named one by one).

    After loading, ``students`` maps every name to a :class:`ModelConfig` and ``teachers`` every name
    to the name of a teacher in the suite's ``teachers``.
    """

    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    step: dict[str, Any] = field(default_factory=lambda: {"name": "weighted_sum"})
    students: dict[str, ModelConfig] | None = None
    teachers: dict[str, Any] | list[str] | None = None
    deploy: list[str] | None = None
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[StageConfig] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    modality: str = "image"


@dataclass
class ModelConfig:
    """A network: ``model`` is a registry name (``relkd list``) or ``torchvision:<name>``; ``args`` go
    to its constructor (``num_classes`` and ``in_channels`` come from the dataset).

    ``init`` starts it from the weights in a checkpoint file (a relkd ``final.pt``: the network of the
    same name, else the first; or a state dict, plain or under ``model`` / ``state_dict``) instead of
    a random initialisation; parameters whose names start with one of ``init_skip`` (e.g. ``[fc]`` for
    a new classifier) keep their random initialisation. A pre-trained student (MEAL V2) or a
    fine-tuned one (transfer learning) is a config line."""

    model: str
    args: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    init_skip: list[str] = field(default_factory=list)


@dataclass
class TeacherConfig:
    """A teacher: trained first (on ``data`` with ``train``: the suite's, with the keys given here
    merged in; by the method ``method``, plain cross-entropy when null), or loaded from
    ``checkpoint`` (a relkd ``final.pt`` or a file holding a state dict).

    Attributes:
        model, args: the network, as in :class:`ModelConfig`.
        like: take ``model`` and ``args`` from the suite's network of this name (``student``: a
            self-teacher; ``teacher``: another copy of the teacher's architecture).
        checkpoint: load the weights instead of training.
        seed: the seed of its training run.
        method: how it is trained: a method name or mapping (e.g. a robust or a margin classifier);
            null is cross-entropy alone.
        data, train: its data and recipe.
    """

    model: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    like: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    method: MethodConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SuiteConfig:
    """A whole experiment: its networks, several methods, several seeds.

    Attributes:
        name: experiment name; the run directory defaults to ``runs/<name>``.
        out: run directory (null: ``runs/<name>``).
        imports: Python modules imported before anything else is read, so that the models, losses,
            datasets, steps and evaluators they register can be named here (also ``--import``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
        amp: ``bf16`` or ``fp16`` autocast on CUDA; null (or on CPU) trains in float32.
        seeds: one student run per seed and method.
        data: the students' data (the teacher's unless ``teacher.data`` changes it).
        students: the trainable networks by name; ``student: {model, args}`` is the short form of
            ``students: {student: {model, args}}``.
        teachers: the teachers by name; ``teacher:`` is the short form of ``teachers: {teacher:
            ...}``, ``teacher: null`` runs the methods without one (CE-only methods). Only the
            teachers some method uses are trained.
        train: the recipe every method starts from.
        methods: ``{method: MethodConfig}``; ``relkd.config.load`` also accepts ``all``, a list of
            built-in method names, and names or YAML paths as values.
        evaluate: evaluators run on every method's deployed networks (added to each method's own).
        loss_args: options per registered loss for this experiment, set on every term of that loss
            over the method's own (e.g. a smaller ``num_negatives`` on a small dataset).
        log_agreement: log student-teacher agreement (kNN overlap, CKA, distance rank correlation)
            of the penultimate embeddings on a fixed probe batch of test images, every epoch.
        probe_size: images in that probe batch.
        tensorboard: also log to TensorBoard when it is installed.
        threads: CPU threads of torch (``torch.set_num_threads``); null keeps torch's default. Small
            models train fastest on one thread, and a shared machine needs it.
        check_teachers: stop the suite when a teacher's test accuracy is within 1.5 times chance
            (a broken recipe or checkpoint), before any student distils from it.
    """

    students: dict[str, ModelConfig]
    name: str = "experiment"
    out: str | None = None
    imports: list[str] = field(default_factory=list)
    device: str = "auto"
    amp: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataConfig = field(default_factory=DataConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict[str, MethodConfig] = field(default_factory=lambda: {"baseline": MethodConfig()})
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_agreement: bool = True
    probe_size: int = 256
    tensorboard: bool = True
    threads: int | None = None
    check_teachers: bool = True

    @property
    def student(self) -> ModelConfig:
        """The suite's student when it has one (``student:`` in the config)."""
        if len(self.students) != 1:
            raise AttributeError(f"the suite has {len(self.students)} students: use config.students")
        return next(iter(self.students.values()))

    @property
    def teacher(self) -> TeacherConfig | None:
        """The suite's teacher named ``teacher``, None when it has none."""
        return self.teachers.get("teacher")
