from setuptools import setup

setup(
    name="dwfast",
    version="0.1.0",
    description="Fused Linear -> BatchNorm1d -> ReLU MLP engine for PyTorch (Triton kernels)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ is shipped as dwfast.kernels: never install a top-level `kernels` module.
    packages=["dwfast", "dwfast.kernels", "bench"],
    package_dir={"dwfast": "dwfast", "dwfast.kernels": "kernels", "bench": "bench"},
    package_data={"dwfast.kernels": ["tiles.json"]},  # the tile table (kernels/tiles.py)
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib", "rich", "scikit-learn"],
    },
)
