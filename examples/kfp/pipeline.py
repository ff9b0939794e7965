"""A pipeline using the lora component, the way the reference pipelines do: the workspace PVC
through dsl.WORKSPACE_PATH_PLACEHOLDER, a dataset artifact, and pod settings that reach the
component as its TaskConfig (`kubernetes_config`).

    python examples/kfp/pipeline.py            # writes lora_pipeline.yaml next to this file
"""
import pathlib
import sys

from kfp import compiler, components, dsl

HERE = pathlib.Path(__file__).resolve().parent
lora = components.load_component_from_file(str(HERE / "lora.component.yaml"))


@dsl.pipeline(
    name="lora-finetune",
    description="Fine-tune a chat model with LoRA on a JSONL dataset",
    pipeline_config=dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(size="20Gi")),
)
def lora_pipeline(
    dataset_uri: str = "s3://datasets/chat/train.jsonl",
    base_model: str = "Qwen/Qwen2.5-0.5B-Instruct",
    epochs: int = 2,
):
    data = dsl.importer(
        artifact_uri=dataset_uri,
        artifact_class=dsl.Dataset,
        reimport=False,
        metadata={"artifact_path": "s3://datasets/chat/train.jsonl"},
    )
    train = lora(
        pvc_path=dsl.WORKSPACE_PATH_PLACEHOLDER,
        dataset=data.output,
        training_base_model=base_model,
        training_num_epochs=epochs,
        training_learning_rate=1e-4,
        training_lora_r=8,
        training_lora_alpha=16,
        training_lr_scheduler="cosine",
        training_seed=42,
        training_envs="HF_HUB_ENABLE_HF_TRANSFER=0",
        training_metadata_labels="team=ml",
        training_train_on_inputs=False,
    )
    train.set_cpu_limit("8")
    train.set_memory_limit("64Gi")
    train.set_accelerator_type("nvidia.com/gpu")
    train.set_accelerator_limit("1")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else str(HERE / "lora_pipeline.yaml")
    compiler.Compiler().compile(lora_pipeline, out)
    print(f"wrote {out}")
