"""The command line: every reference flag with its spelling and default, plus a few additions,
parsed and checked in one place."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re

from seqmatchnet.cli.entry import HelpFormatter, OneLineParser
from seqmatchnet.cli.modes import MODES, SHARED, split_mode
from seqmatchnet.common.errors import UserError
from seqmatchnet.data.spacing import check_spacing
from seqmatchnet.data.synthetic import SyntheticParams
from seqmatchnet.matching.seqmatch import DISTANCES
from seqmatchnet.models.sequence import METHODS
from seqmatchnet.speeds import trajectories

OPTIMISERS = ("SGD", "ADAM")
DESCRIPTION = "SeqMatchNet: contrastive learning with sequence matching for place recognition."


def build_parser(mode: str | None = None) -> argparse.ArgumentParser:
    """Every option of train/test/localize (each mode accepts them all); with ``mode``, ``--help``
    lists only the options that mode reads (``READ_BY``), each default once."""
    p = OneLineParser(
        mode=mode or "", prog="main.py" if mode is None else f"main.py --mode {mode}",
        formatter_class=HelpFormatter,
        usage=None if mode is None else f"python main.py --mode {mode} --seqL L [options]",
        description=mode_help(mode) if mode in SHARED_MODES else DESCRIPTION,
        epilog=f"Each mode has its own --help: python main.py --mode {{{','.join(MODES)}}} --help "
               "(docs/options.md).")
    g = p.add_argument_group("run")
    g.add_argument("--mode", type=str, default="train", choices=tuple(MODES),
                   help="train, test (evaluate), localize (online, frame by frame), extract "
                        "(images to NetVLAD descriptors), prepare (your own data), demo "
                        "(synthetic walk-through), compare (runs side by side); each mode has its "
                        "own --help")
    g.add_argument("--nocuda", action="store_true", help="run on the CPU")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available, else the CPU; cuda: require CUDA (an error "
                        "without it)")
    g.add_argument("--nGPU", type=int, default=1, help="number of GPUs (nn.DataParallel when > 1)")
    g.add_argument("--threads", type=int, default=8,
                   help="accepted for compatibility: descriptors are held in memory and mining "
                        "runs in the main process, so no worker processes are needed")
    g.add_argument("--seed", type=int, default=123, help="random seed")
    g.add_argument("--quiet", action="store_true", help="print only results and errors")
    g.add_argument("--debug", action="store_true", help="print full tracebacks and debug messages")
    g.add_argument("--wandb", type=str, default="disabled",
                   choices=["disabled", "offline", "online"],
                   help="log to Weights & Biases too (TensorBoard is always written)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="nordland-sw",
                   help="nordland-sw, nordland-sf, oxford-v1.0, oxford-pnv, msls, synthetic, or "
                        "custom:<name> (your own data, written by --mode prepare --name <name>)")
    g.add_argument("--dataPath", type=str, default="./data",
                   help="folder holding descData/<descType>/")
    g.add_argument("--structPath", type=str, default="./structFiles",
                   help="folder holding the .db struct files")
    g.add_argument("--descType", type=str, default="netvlad-pytorch",
                   help="descriptor folder under descData/")
    g.add_argument("--split", type=str, default="val", choices=["test", "train", "val"],
                   help="split to evaluate")
    g.add_argument("--seqL", type=int, default=None, help="sequence length, in frames (required)")
    g.add_argument("--seqL_filterData", type=int, default=None,
                   help="evaluate only frames whose centred window of this length needs no shift "
                        "(not given: every frame, and on --split train those with a full --seqL "
                        "window, as the reference)")
    g.add_argument("--msls_trainCity", type=str, default="melbourne",
                   help="MSLS city used for training")
    g.add_argument("--msls_valCity", type=str, default="austin",
                   help="MSLS city used for validation and test")
    g.add_argument("--oxfordHonestVal", action="store_true",
                   help="Oxford: validate on a spatial block held out of the training route "
                        "instead of the test split (the reference validates on the test split)")
    g.add_argument("--splitGaps", type=str, default="join", choices=["join", "cut"],
                   help="Oxford: where a split index file skips frames, join the parts into one "
                        "segment (join, the reference) or cut the segment there, so that no window "
                        "spans a gap (cut)")
    add_synthetic_options(p)
    add_localize_options(p)

    g = p.add_argument_group("model")
    g.add_argument("--pooling", action="store_true",
                   help="learn the 1x1 temporal-conv projection (WXpB)")
    g.add_argument("--outDims", type=int, default=None,
                   help="output dimensions of the projection (not given: the descriptors' "
                        "dimensions, 4096 for the published NetVLAD descriptors)")
    g.add_argument("--matcher", type=str, default="seqMatchNet", choices=["seqMatchNet", "None"],
                   help="seqMatchNet: sequence matching; None: single-frame descriptors (needs "
                        "--seqL 1)")
    g.add_argument("--method", type=str, default="seqmatch", choices=METHODS,
                   help="how sequences are compared: seqmatch (SeqMatchNet's sequence matching), "
                        "single (single frames), smooth (window mean), delta (Delta Descriptors), "
                        "seqnet (SeqNet)")
    g.add_argument("--w", type=int, default=3,
                   help="SeqNet temporal kernel width (--method seqnet; 3, as SeqNet's command "
                        "line)")
    g.add_argument("--cacheBatchSize", type=int, default=64,
                   help="frames per batch when computing descriptors")
    g.add_argument("--velocities", type=str, default="1", metavar="VMIN:VMAX:VSTEP",
                   help="database frames per query frame to match sequences at (a range or a "
                        "comma list): 1 is the reference's diagonal; 0.5:2:0.5 matches traversals "
                        "driven at other speeds (docs/speeds.md)")
    g.add_argument("--trajectoryGrid", type=str, default="half", choices=sorted(trajectories.GRIDS),
                   help="with --velocities: where a trajectory may sit between database frames: "
                        "half (midpoints and half-frame anchors, the mean of the two neighbours' "
                        "distances) or whole (SeqSLAM's rounding to whole frames)")
    g.add_argument("--init", type=str, default="random", metavar="random|identity|RUN",
                   help="initial projection: random (reference), identity-like (needs --outDims = "
                        "input dims), or the weights of a run folder RUN (--ckpt chooses its "
                        "checkpoint; its model options are taken too): a new run, e.g. to "
                        "fine-tune on another dataset")

    g = p.add_argument_group("training")
    g.add_argument("--batchSize", type=int, default=16,
                   help="queries per batch (each with 1 positive, <=10 negatives)")
    g.add_argument("--cacheRefreshRate", type=int, default=1000,
                   help="queries between refreshes of the mining cache (0: once per epoch)")
    g.add_argument("--nEpochs", type=int, default=50, help="epochs to train")
    g.add_argument("--start-epoch", dest="start_epoch", type=int, default=0,
                   help="epoch number to start from")
    g.add_argument("--optim", type=str, default="SGD", choices=OPTIMISERS, help="optimiser")
    g.add_argument("--lr", type=float, default=0.001, help="learning rate")
    g.add_argument("--lrStep", type=float, default=5, help="epochs between learning-rate drops")
    g.add_argument("--lrGamma", type=float, default=0.5,
                   help="learning-rate multiplier at each drop")
    g.add_argument("--weightDecay", type=float, default=0.001, help="weight decay (SGD)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum (SGD)")
    g.add_argument("--margin", type=float, default=0.1,
                   help="triplet margin squared (the hinge uses sqrt(margin))")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without improvement (0: off)")
    g.add_argument("--evalEvery", type=int, default=1, help="validate every N epochs")
    g.add_argument("--loss_trip_method", type=str, default="meanOfPairs", choices=DISTANCES,
                   help="sequence distance in the triplet loss")
    g.add_argument("--negCache", type=str, default="on", choices=["on", "off"],
                   help="on: each query's last hard negatives are candidates at the next refresh "
                        "(the reference intended this but lost it inside DataLoader workers); "
                        "off: mine without them, as the paper's runs did with --threads 8")
    g.add_argument("--neg_trip_method", type=str, default="meanOfPairs", choices=DISTANCES,
                   help="sequence distance for hard-negative mining")

    g = p.add_argument_group("runs and outputs")
    g.add_argument("--expName", type=str, default="",
                   help="run name suffix: the run folder is <date>_l<seqL>_<expName> "
                        "(<date>_l<seqL> without it)")
    g.add_argument("--runsPath", type=str, default="./data/runs", help="folder of run folders")
    g.add_argument("--savePath", type=str, default="checkpoints",
                   help="checkpoint folder inside a run folder")
    g.add_argument("--cachePath", type=str, default="./data/cache",
                   help="accepted for compatibility: the mining cache is kept in memory, one "
                        "--cacheRefreshRate chunk at a time, so nothing is written here")
    g.add_argument("--resume", type=str, default="",
                   help="run folder to continue (train) or evaluate (test, localize); not given: "
                        "a new run (train), the raw descriptors (test, localize)")
    g.add_argument("--ckpt", type=str, default="latest", choices=["latest", "best"],
                   help="checkpoint to load")
    g.add_argument("--resultsPath", type=str, default=None,
                   help="folder for results (results.npz, summary.json, figures); not given: the "
                        "results are only printed")
    g.add_argument("--numSamples2Project", type=int, default=-1,
                   help="t-SNE embed this many descriptors into the results (-1: off)")
    g.add_argument("--extractOnly", action="store_true",
                   help="save sequence descriptors instead of evaluating")
    g.add_argument("--predictionsFile", type=str, default=None,
                   help=".npz with 'preds' (numQ x >=20): re-rank each query's first 20 "
                        "candidates (not given: search every database window)")
    g.add_argument("--figures", type=str, default="epoch", choices=["epoch", "end", "none"],
                   help="PNG/TensorBoard figures of validation runs: after every validation, only "
                        "at the end, or none")
    g.add_argument("--queryChunk", type=int, default=1024,
                   help="query windows scored at once (bounds memory)")
    g.add_argument("--dbChunk", type=int, default=0,
                   help="database windows scored at once (0: all, or automatic when the matrix "
                        "would not fit)")
    add_large_map_options(p)
    if mode in SHARED_MODES:
        show_only(p, mode)
    return p


# The modes of this parser (the others have their own), what each does, and which options each
# reads:
# by group, with exceptions by option. Every mode accepts every option; --help lists those it reads.
SHARED_MODES = SHARED


def mode_help(mode: str) -> str:
    return f"--mode {mode}: {MODES[mode].help}."


READ_BY = {
    "training": ("train",), "large maps": ("train", "test"), "online localisation": ("localize",),
    "nGPU": ("train", "test"), "wandb": ("train",), "split": ("test", "localize"),
    "seqL_filterData": ("train", "test"), "velocities": ("train", "test", "localize"),
    "trajectoryGrid": ("train", "test", "localize"), "init": ("train",),
    "expName": ("train",), "runsPath": ("train",), "cachePath": ("train",),
    "resultsPath": ("test", "localize"),
    "numSamples2Project": ("test",), "extractOnly": ("test",), "predictionsFile": ("test",),
    "figures": ("train", "test"), "queryChunk": ("train", "test"), "dbChunk": ("train", "test"),
}


def show_only(parser: argparse.ArgumentParser, mode: str) -> None:
    """Leave out of ``--help`` (not out of parsing) the options ``mode`` does not read."""
    for group in parser._action_groups:
        by_group = next((v for k, v in READ_BY.items()
                         if group.title and group.title.startswith(k)), SHARED_MODES)
        for action in group._group_actions:
            if mode not in READ_BY.get(action.dest, by_group):
                action.help = argparse.SUPPRESS


def add_large_map_options(parser: argparse.ArgumentParser) -> None:
    """Evaluation over maps larger than memory (docs/large-maps.md)."""
    g = parser.add_argument_group("large maps")
    g.add_argument("--mapChunk", type=int, default=32768,
                   help="database frames read and projected at once: a larger database is "
                        "streamed from its file in chunks of this many frames, so memory depends "
                        "on this, not on the map")
    g.add_argument("--featDtype", type=str, default="float32", choices=["float32", "float16"],
                   help="storage of projected frame features (distances always accumulate in "
                        "float32)")
    g.add_argument("--shortlist", type=int, default=0, metavar="K",
                   help="sequence-match only the K database windows nearest to each query window "
                        "in a faiss index over one descriptor per window (0: off, match every "
                        "window exactly)")
    g.add_argument("--nprobe", type=int, default=16,
                   help="inverted lists searched per query when the --shortlist index is an IVF "
                        "index")
    g.add_argument("--shortlistIndex", type=str, default=None, metavar="FILE",
                   help="keep the --shortlist index in FILE: read when it holds one built for "
                        "this map, model and settings (refused otherwise), built and written "
                        "there when missing (not given: built in memory each run)")
    g.add_argument("--shortlistCheck", type=int, default=50, metavar="N",
                   help="queries matched exactly to measure the --shortlist recall (0: not "
                        "measured; with an index read from --shortlistIndex the database is then "
                        "not streamed at all)")


def add_synthetic_options(parser: argparse.ArgumentParser) -> None:
    """``--synth_<field>`` for every field of ``synthetic.SyntheticParams`` (default: the
    field's)."""
    g = parser.add_argument_group("synthetic benchmark (--dataset synthetic; regenerated when "
                                  "these change)")
    notes = _field_notes(SyntheticParams)
    for f in dataclasses.fields(SyntheticParams):
        # the option's own default is None: "not given", the benchmark's value
        kind = type(f.default)
        g.add_argument(f"--synth_{f.name}", type=kind, default=None, metavar=kind.__name__.upper(),
                       help=f"{notes.get(f.name, re.sub('_m$', ' (m)', f.name).replace('_', ' '))} "
                            f"(default: {f.default})")


def _field_notes(cls) -> dict[str, str]:
    """The comment beside each field of dataclass ``cls`` in its source (``name: type = value  #
    note``)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):        # no source (a frozen build): the fields' names serve
        return {}
    return dict(re.findall(r"^\s+(\w+): [\w.\[\] |]+ = [^#\n]+#\s*(.+?)\s*$", source, re.M))


def add_localize_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``--mode localize`` as their own group of ``parser``."""
    g = parser.add_argument_group("online localisation (--mode localize)")
    g.add_argument("--output", type=str, default=None, metavar="FILE.csv",
                   help="CSV with one row per query frame (query_frame, db_frame, distance, "
                        "confidence, latency_ms); without it, replay prints only the summary and "
                        "--stream writes to stdout")
    g.add_argument("--stream", type=str, default=None, metavar="FILE.npy|-",
                   help="localise query descriptors arriving from another process instead of "
                        "replaying the split's queries: a .npy [frames, dims], or '-' for raw "
                        "little-endian float32 rows on standard input (needs --dim)")
    g.add_argument("--dim", type=int, default=None, metavar="D",
                   help="values per row of --stream - (the raw descriptor dimensions of the "
                        "dataset)")
    g.add_argument("--confRadius", type=float, default=None, metavar="R",
                   help="confidence = best distance / best distance among database windows ending "
                        "farther than R (position units: metres, frames on Nordland) from the "
                        "match; lower is more confident (not given: the split's posDistThr)")
    g.add_argument("--spacing", type=float, default=None, metavar="METRES",
                   help="step the matcher only when the vehicle has travelled this far (the "
                        "replay's odometry along the query positions; the last value of each "
                        "--stream row); the frames in between get the last match, marked held")
    add_query_bag_options(g)


def add_query_bag_options(g) -> None:
    """``--bag`` with its topics, the image model and ``--out_bag`` (docs/localize.md, "From a
    recorded bag")."""
    from seqmatchnet.cli.bag_options import add_topic_options
    from seqmatchnet.cli.image_options import add_model_options

    g.add_argument("--bag", type=str, default=None, metavar="BAG",
                   help="localise the frames of a recording (ROS 1 .bag, ROS 2 bag folder, .mcap) "
                        "instead of replaying the split's queries; needs --imageTopic, the image "
                        "model (--model/--weights) and --dataset custom:NAME")
    add_topic_options(g)
    add_model_options(g)        # with --bag: the model and size the dataset was extracted with
    g.add_argument("--out_bag", type=str, default=None, metavar="FILE.mcap",
                   help="with --bag: also write the matches as an MCAP recording, one "
                        "seqmatchnet_msgs/msg/Match per matched frame on /seqmatchnet/match")


def check_localize_options(opt: argparse.Namespace) -> None:
    """Refuse ``--mode localize`` option combinations that cannot work."""
    stream, dim = getattr(opt, "stream", None), getattr(opt, "dim", None)
    if stream == "-" and dim is None:
        raise UserError("--stream - reads raw float32 rows: give their width with --dim D")
    if dim is not None and dim < 1:
        raise UserError(f"--dim must be at least 1, got {dim}")
    if dim is not None and stream != "-":
        raise UserError("--dim gives the row width of --stream -; a .npy stream carries its own "
                        "shape")
    radius = getattr(opt, "confRadius", None)
    if radius is not None and not (math.isfinite(radius) and radius >= 0):
        raise UserError(f"--confRadius must be a non-negative number, got {radius}")
    check_spacing(opt.spacing, "--spacing")
    _check_query_bag(opt)
    if getattr(opt, "method", "seqmatch") in ("smooth", "delta", "seqnet"):
        raise UserError(f"--mode localize matches frame sequences; --method {opt.method} compares "
                        "one descriptor per window: use --method seqmatch")


def _check_query_bag(opt: argparse.Namespace) -> None:
    """``--bag`` goes with ``--imageTopic`` (and not with ``--stream``); the image model and
    ``--out_bag`` go with ``--bag``."""
    bag = getattr(opt, "bag", None)
    if bag is None:
        given = [f"--{k}" for k in ("imageTopic", "gpsTopic", "odomTopic", "model", "weights",
                                    "netvladCkpt", "imageSize", "out_bag")
                 if getattr(opt, k, None) is not None]
        if given:
            raise UserError(f"{given[0]} is only used with --bag (localise a recording)")
        return
    if opt.stream is not None:
        raise UserError("give the query frames once: --bag BAG or --stream, not both")
    if opt.imageTopic is None:
        raise UserError("--bag needs --imageTopic TOPIC (the camera topic)")
    if opt.spacing is not None and not (opt.gpsTopic or opt.odomTopic):
        raise UserError("--spacing with --bag needs --gpsTopic or --odomTopic (the distance "
                        "travelled)")
    if opt.out_bag is not None and not opt.out_bag.lower().endswith(".mcap"):
        raise UserError(f"--out_bag {opt.out_bag}: the file name must end in .mcap")


# ---------------------------------------------------------------- the mode


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """Refuse option combinations that cannot work, right after parsing."""
    _check_sequence_options(opt)
    _check_counts(opt)
    _check_shortlist_options(opt)
    _check_speeds(opt)
    _check_training_options(opt)
    if opt.mode == "localize":
        check_localize_options(opt)
    return opt


def _check_sequence_options(opt: argparse.Namespace) -> None:
    """The sequence length, the method and the matcher."""
    if opt.seqL is None:
        raise UserError("--seqL is required (e.g. --seqL 5; --seqL 1 with --matcher None for "
                        "single frames)")
    if opt.seqL < 1:
        raise UserError(f"--seqL must be at least 1, got {opt.seqL}")
    if opt.seqL_filterData is not None and opt.seqL_filterData < 1:
        raise UserError("--seqL_filterData must be at least 1")
    if opt.matcher == "None" and opt.seqL != 1:
        raise UserError("--matcher None compares single frames: use it with --seqL 1")
    if opt.method == "seqnet" and opt.pooling:
        raise UserError("--method seqnet learns its own temporal convolution: drop --pooling")
    if opt.w < 1:
        raise UserError(f"--w must be at least 1, got {opt.w}")
    if opt.method == "single" and opt.seqL != 1:
        raise UserError("--method single compares single frames: use it with --seqL 1")


def _check_counts(opt: argparse.Namespace) -> None:
    """Sizes, counts and the seed within their ranges."""
    for name in ("batchSize", "cacheBatchSize", "nEpochs", "outDims", "evalEvery", "queryChunk"):
        if getattr(opt, name) is not None and getattr(opt, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if not 0 <= opt.seed < 2**31:
        raise UserError(f"--seed must be between 0 and {2**31 - 1}, got {opt.seed}")
    for name in ("cacheRefreshRate", "patience", "start_epoch", "threads", "dbChunk"):
        if getattr(opt, name) < 0:
            flag = name.replace('_', '-') if name == 'start_epoch' else name
            raise UserError(f"--{flag} must not be negative")
    for name in ("mapChunk", "nprobe"):
        if getattr(opt, name, 1) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(opt, name)}")


def _check_shortlist_options(opt: argparse.Namespace) -> None:
    """The shortlist (``--shortlist``, ``--shortlistCheck``, ``--shortlistIndex``) and its
    alternative, ``--predictionsFile``."""
    if getattr(opt, "shortlist", 0) < 0:
        raise UserError(f"--shortlist must not be negative (0 turns it off), got {opt.shortlist}")
    if getattr(opt, "shortlistCheck", 0) < 0:
        raise UserError("--shortlistCheck must not be negative (0: no check), got "
                        f"{opt.shortlistCheck}")
    if getattr(opt, "shortlistIndex", None) and not getattr(opt, "shortlist", 0):
        raise UserError("--shortlistIndex keeps the --shortlist index: give --shortlist K too")
    if getattr(opt, "shortlist", 0) and opt.predictionsFile:
        raise UserError("--shortlist and --predictionsFile both choose the candidates to re-rank: "
                        "give one of them")


def _check_speeds(opt: argparse.Namespace) -> None:
    """``--velocities`` (one line if malformed) matches frame sequences only."""
    speeds = trajectories.trajectories(trajectories.parse_velocities(opt.velocities), opt.seqL,
                                       grid=trajectories.GRIDS[opt.trajectoryGrid])
    if not speeds.is_diagonal and (opt.method != "seqmatch" or opt.matcher == "None"):
        raise UserError("--velocities matches frame sequences: use it with --method seqmatch, not "
                        f"--method {opt.method if opt.matcher != 'None' else 'single'}")


def _check_training_options(opt: argparse.Namespace) -> None:
    """The learning rate, its schedule, the margin and the options of one mode only."""
    if not opt.lrStep > 0:
        raise UserError(f"--lrStep must be a positive number of epochs, got {opt.lrStep}")
    if opt.lr <= 0 or opt.margin < 0:
        raise UserError("--lr must be positive and --margin not negative")
    if opt.mode == "train" and opt.extractOnly:
        raise UserError("--extractOnly is for --mode test")
    if opt.init not in ("random", "identity") and opt.mode != "train":
        raise UserError(f"--init {opt.init} starts a training run from that run's weights: to "
                        "evaluate a run, give it to --resume")


def parse_options(argv: list[str], mode: str | None = None) -> argparse.Namespace:
    """The options of ``argv``, checked; ``--help`` lists those of ``mode`` (``main.py`` read it
    already and gives ``argv`` without ``--mode``; without ``mode`` it is read from ``argv``)."""
    if mode is None:
        mode, argv = split_mode(argv)
    parser = build_parser(mode if mode in SHARED_MODES else None)
    parser.set_defaults(mode=mode)
    return check_options(parser.parse_args(join_dash_values(argv)))


def join_dash_values(argv: list[str], options: tuple[str, ...] = ("--velocities",)) -> list[str]:
    """``--velocities -1:1:0.5`` read as ``--velocities=-1:1:0.5``: argparse takes a value that
    starts with ``-`` and is not a plain number for an option ("expected one argument")."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in options and arg[:1] == "-" and arg[1:2] in tuple("0123456789."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out
