"""The ``placer serve`` command (registered in :mod:`placer.cli`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from placer.cli.options import (
    CONTEXT,
    FiniteFloat,
    cluster_options,
    echo_json_line,
    model_option,
    parse_exports,
    placement_stack,
    read_placement,
    resolve_model,
    resolve_stack,
    resolve_topology,
    stack_option,
)
from placer.errors import InvalidInputError
from placer.presets import check_problem_size
from placer.stacks import resolve_dispatch
from placer.types import DISPATCH_RULES


@click.command(context_settings=CONTEXT)
@model_option
@cluster_options
@click.option("--watch", "watch_dir", type=click.Path(), default=None,
              help="Directory where SGLang dumps or placer stats files land (polled every --interval).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; a non-local one needs a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
@click.option("--token", envvar="PLACER_SERVE_TOKEN", default=None, show_envvar=True,
              help="Bearer token every request must carry (Authorization: Bearer TOKEN).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), default=None,
              help="State file (.json, or .npz for large models); a restart resumes from it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Placement JSON rewritten atomically on each publication.")
@click.option("--export", "exports", multiple=True, metavar="FMT=PATH",
              help="Also rewrite a serving-stack file on each publication (sglang, trtllm, ...). Repeatable.")
@click.option("--initial", type=click.Path(dir_okay=False), default=None,
              help="Placement the serving stack runs now: placer's JSON or the stack's own file (SGLang .json/.pt, "
                   "vllm-ascend .json, TRT-LLM .yaml, EPLB .npz; with --model and --gpus) (default: contiguous, "
                   "slot p holds expert p % E).")
@click.option("--method", default="eplb", show_default=True, help="Placement method re-solved on the window.")
@click.option("--redundant", type=click.IntRange(min=0), default=None,
              help="Redundant slots per layer (default: the initial placement's, else 0).")
@click.option("--dispatch", type=click.Choice(DISPATCH_RULES), default=None,
              help="Replica dispatch rule (default: --stack's, else the initial placement's, else nearest).")
@stack_option
@click.option("--half-life", type=FiniteFloat(min=0, min_open=True), default=8.0, show_default=True,
              help="Window half-life in observations.")
@click.option("--threshold", type=FiniteFloat(min=0), default=0.05, show_default=True,
              help="Publish only when the predicted step-time gain minus migration cost exceeds this fraction.")
@click.option("--horizon", "horizon_s", type=FiniteFloat(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds a new placement is expected to serve (amortises migration).")
@click.option("--interval", "interval_s", type=FiniteFloat(min=0, min_open=True), default=5.0,
              show_default=True, help="Seconds between directory scans and between evaluations.")
@click.option("--tokens-per-rank", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per rank per simulated step.")
@click.option("--time-limit", "time_limit_s", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Wall-clock limit of each solve (seconds).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the solver and the simulator.")
@click.option("--movement-aware/--no-movement-aware", default=True, show_default=True,
              help="Re-solve from the running placement, weighing the weights moved against the objective "
                   "gained over --horizon, layer by layer (as solve --from); off: the method's answer as it is.")
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None,
              help="Run the re-solves on this Ray cluster (host:port, or auto; default RAY_ADDRESS when set): "
                   "placer's layer subproblems spread over its nodes, any other method runs as one task there.")
@click.option("--verbose", is_flag=True, help="Log every request.")
@click.option("--quiet", is_flag=True,
              help="Log only warnings and errors on stderr (not each observation, re-solve and decision).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the service's events on stdout as JSON lines (listening, stopped) instead of text; "
                   "decisions stay in the log and in GET /status.")
def serve(model, cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed, watch_dir, host, port, token, state_path, output, exports,
          initial, method, redundant, dispatch, stack, half_life, threshold, horizon_s, interval_s, tokens_per_rank,
          time_limit_s, seed, movement_aware, ray_address, verbose, quiet, as_json):
    """Run a rebalancing service: watch load, re-solve, publish a placement when it pays.

    Load arrives by POST /stats ({"load": [[...]]}, MoE layers x experts) and as files in
    --watch. The service keeps a decayed window, re-solves with --method in the background and
    publishes (--output, GET /placement?format=placer|sglang) only when the simulated
    step-time gain minus the migration time over --horizon exceeds --threshold. GET /metrics
    (Prometheus), GET /healthz, GET /status. Stop it with Ctrl-C or SIGTERM. Each re-solve and
    its decision is logged on stderr (--quiet: warnings only).

    \b
    Example:
        placer serve --model mixtral-8x7b --gpus 8 --watch /tmp/dumps --state s.json -o p.json
        placer serve --model mixtral-8x7b --gpus 8 --port 0 --json --quiet
        curl -X POST localhost:8000/stats -d '{"load": [[...], ...]}'
        curl 'localhost:8000/placement?format=sglang'
    """
    from placer.app.serve import (  # deferred: keeps numba off placer --help
        PolicyConfig,
        ServeConfig,
        Service,
    )
    from placer.ilp import METHODS  # deferred: keeps ortools off placer --help
    from placer.io.atomic import check_writable  # deferred: keeps numba off placer --help

    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}", source="--method")
    init = None
    target = resolve_stack(stack)
    if initial:
        pf = read_placement(initial, model, cluster, gpus, nodes, gpus_per_node, target, topology_file, gpu_speed)
        spec, topology, init = pf.model, pf.topology, pf.placement
        fallback = pf.dispatch
        target = placement_stack(pf, target)
        redundant = init.num_redundant if redundant is None else redundant
    else:
        spec = resolve_model(model)
        if spec is None:
            raise InvalidInputError("serve needs --model PRESET (or --initial PLACEMENT.json)", source="--model")
        topology = resolve_topology(cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed)
        fallback = "nearest"
    dispatch = resolve_dispatch(dispatch, target, spec, fallback=fallback)
    if target is None and initial:
        target = pf.stack  # recorded in the placements the service writes
    policy = PolicyConfig(method=method, redundant=redundant or 0, dispatch=dispatch,
                          threshold=threshold, horizon_s=horizon_s, tokens_per_rank=tokens_per_rank,
                          time_limit_s=time_limit_s, seed=seed, ray_address=ray_address,
                          movement_aware=movement_aware)
    export_list = tuple(parse_exports(exports))
    check_problem_size(spec, topology, simulate=True)  # the policy simulates each candidate placement
    for out_path in (output, state_path, *(p for _, p in export_list)):
        if out_path:  # written later by the running service: refuse now, before binding
            check_writable(out_path)
    config = ServeConfig(model=spec, topology=topology, policy=policy, half_life=half_life, interval_s=interval_s,
                         watch_dir=watch_dir, state_path=state_path, output_path=output,
                         exports=export_list, initial=init, initial_source=initial or "",
                         host=host, port=port, token=token or None, stack=target)
    if verbose and quiet:
        raise click.UsageError("give --verbose or --quiet, not both")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s placer serve: %(levelname)s %(message)s")
    if ray_address is not None:  # joined here, in the main thread, before the port is bound
        from placer._ray import init as ray_init  # deferred: ray is an optional extra

        ray_init(ray_address, "re-solving on a Ray cluster (--ray-address)", include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    service = Service(config)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bound_host, bound_port = service.start()
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if as_json:
        echo_json_line({"event": "listening", "url": f"http://{shown}:{bound_port}", "model": spec.name,
                        "gpus": topology.num_gpus, "method": method, "dispatch": policy.dispatch,
                        "stack": None if target is None else target.label, "threshold": threshold,
                        "ray_address": ray_address, "origin": service.origin})
    else:
        click.echo(f"placer serve: listening on http://{shown}:{bound_port} ({spec.name}, {topology.num_gpus} GPUs, "
                   f"method {method}, dispatch {policy.dispatch}"
                   + (f" of {target.label}" if target is not None else "") + f", threshold {threshold}"
                   + (f", re-solves on the Ray cluster at {ray_address}" if ray_address is not None else "")
                   + f"); {service.origin}")
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    if as_json:
        echo_json_line({"event": "stopped", "state_saved": state_path})
    else:
        click.echo("placer serve: stopped; state saved" if state_path else "placer serve: stopped")
