"""pip install of the hqsmem_ros library and its `hqsmem` console script.

On a robot the ROS 2 package is built by colcon from CMakeLists.txt/package.xml; this file is for
pip installs of the ROS-free core (and the ROS 2 PyPI wheels used on machines without ROS).
"""
from setuptools import find_packages, setup

setup(
    name="hqsmem_ros",
    version="0.1.0",
    description="HQ-SMem video object segmentation and tracking (core library and ROS 2 node)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hqsmem_ros", "hqsmem_ros.*"]),
    package_data={"hqsmem_ros": ["config/*.yaml"]},
    # The .msg definitions, for reading/writing bags without a ROS build (hqsmem bag, rosbags).
    data_files=[("share/hqsmem_ros/msg", sorted(__import__("glob").glob("msg/*.msg")))],
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.23",
        "opencv-python-headless>=4.7",
        "pillow>=9",
        "pyyaml>=6",
        "psutil>=5.9",
        "simplejpeg>=1.6",  # JPEG decoding 15-23 % faster than OpenCV's, same pixels (image_codec)
    ],
    extras_require={
        # The paper's neural models. torch is not pinned: Jetsons bring NVIDIA's own wheels.
        "models": ["torch>=2.1", "torchvision", "timm>=0.9", "segment-anything-hq>=0.3", "safetensors"],
        "bag": ["rosbags>=0.10"],
        "plots": ["matplotlib>=3.7"],
        # `hqsmem bags --ray`: the same work on a Ray cluster (hqsmem_ros/fleet/).
        "cluster": ["ray>=2.9", "rosbags>=0.10"],
        "test": ["pytest>=7", "rosbags>=0.10", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["hqsmem=hqsmem_ros.cli:main"]},
)
