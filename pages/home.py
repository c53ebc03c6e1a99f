"""Home: the seven stages as a path, each with its state read from disk, and the machine."""

import streamlit as st

from core.stages import overview
from pages._ui import STAGES, escape, polling

st.title("🔍 Glass Box LLM")
st.markdown(
    "Build a working GPT-style language model on this computer, in seven runnable stages — "
    "from raw text to a model that follows instructions and is graded by a judge. "
    "Every number is computed here, in front of you; nothing is a black box."
)

def the_path() -> None:
    """The seven stages with their runs and jobs, re-read from disk every few seconds."""
    space = overview.workspace()
    all_runs, active = space["runs"], space["active"]
    st.header("The path")
    for stage in STAGES:
        stage_runs = [r for r in all_runs if r.stage in stage.run_stages]
        running = [r for r in stage_runs if r.id in active]
        with st.container(border=True):
            left, right = st.columns([3, 2])
            left.page_link(stage.file, label=f"**{stage.number}. {stage.title}**", icon=stage.icon)
            left.caption(stage.teaches)
            if running:
                right.markdown(f"🏃 running: `{escape(running[0].id)}` ({escape(active[running[0].id].state)})")
            elif stage_runs:
                finished = sum(r.state == "finished" for r in stage_runs)
                right.markdown(f"✅ {len(stage_runs)} run(s), {finished} finished — newest `{escape(stage_runs[0].id)}`")
            elif stage.run_stages:
                right.markdown("○ no runs yet")
            else:
                right.markdown("○ nothing to save: explore it live")
    broken = space["broken"]
    if broken:
        st.warning("Some runs have damaged files and are skipped: "
                   + "; ".join(f"{r.id}: {r.error}" for r in broken))


# Re-read every 3 s while a job runs (15 s when none does), more slowly in a full room.
st.fragment(run_every=polling.every(3 if overview.jobs_active() else 15))(the_path)()

st.header("This machine")
info = overview.machine()
cols = st.columns(4)
cols[0].metric("Device", info["device"].upper())
cols[1].metric("Torch threads", info["threads"])
cols[2].metric("Physical cores", info["physical_cores"])
cols[3].metric("PyTorch", info["torch"])
if info["device"] == "cpu":
    st.caption("Training runs in fp32 on the CPU (bf16 is ~100× slower on CPUs). "
               "A CUDA GPU or Apple MPS is used automatically when present.")

st.header("Where things live")
where = overview.folders()
st.markdown(f"- **Checkpoints** (runs): `{where['checkpoints']}`\n"
            f"- **Downloads and uploads**: `{where['downloads']}`\n"
            f"- **Data folders searched**: " + ", ".join(f"`{d}`" for d in where["search"]))
sources = overview.data_sources()
st.dataframe(
    [{"source": s["name"], "here": "✅" if s["available"] else "—", "bytes": s["bytes"],
      "what": s["description"], "licence": s["licence"]} for s in sources],
    hide_index=True,
)
missing = [s["name"] for s in sources if not s["available"]]
if missing:
    st.info("Not on this machine yet: " + ", ".join(missing) + ". The built-in `python-docs` corpus "
            "always works. To add the others: `python -m core data fetch NAME` when online, point "
            "`GLASSBOX_DATA_DIR` at a folder that holds them, or upload a text file on stage 1.")
