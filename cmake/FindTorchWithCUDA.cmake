# Locates the Torch CMake package and, when that torch is a CUDA build, the CUDA pieces its package
# insists on (a toolkit, nvrtc, cuBLAS headers) before find_package(Torch) runs, so that configuring
# against a pip-installed torch needs no hand-written -D options.
#
#   customlayers_prepare_torch()  sets Torch_DIR (if unset), TORCH_ROOT, TORCH_CUDA_VERSION (empty for a
#                                 CPU torch), CUSTOMLAYERS_PIP_CUDA_INCLUDE_DIRS and the CUDA variables
#                                 torch's package reads; the installed customlayersConfig.cmake uses it.
#   customlayers_find_torch()     the same, the C++ standard torch's headers need, then find_package(Torch).
#
# Torch_DIR comes from, in order: -DTorch_DIR / $Torch_DIR, -DPython3_EXECUTABLE's torch
# (`torch.utils.cmake_prefix_path`), CMAKE_PREFIX_PATH (a libtorch directory, or torch.utils.cmake_prefix_path
# itself as in PyTorch's C++ docs), CUSTOMLAYERS_DEFAULT_TORCH_DIR (the installed package's torch), the torch
# of the first python3 on PATH.
# The CUDA toolkit comes from CUDAToolkit_ROOT / CUDA_TOOLKIT_ROOT_DIR / CMAKE_CUDA_COMPILER if given,
# else $CUDA_HOME, $CUDA_PATH, /usr/local/cuda-<torch's CUDA version>, /usr/local/cuda.
# A pip torch keeps the CUDA runtime libraries and headers (nvrtc, cuBLAS, ...) under
# site-packages/nvidia/*/{lib,include}; those are used where the toolkit lacks them.

function(_customlayers_python_torch_dir python out)
  set(${out} "" PARENT_SCOPE)
  if(python)
    execute_process(
      COMMAND "${python}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE prefix OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
    if(rc EQUAL 0 AND EXISTS "${prefix}/Torch/TorchConfig.cmake")
      set(${out} "${prefix}/Torch" PARENT_SCOPE)
    endif()
  endif()
endfunction()

function(_customlayers_locate_torch_dir out)
  if(Torch_DIR AND EXISTS "${Torch_DIR}/TorchConfig.cmake")
    set(${out} "${Torch_DIR}" PARENT_SCOPE)
    return()
  endif()
  if(DEFINED ENV{Torch_DIR} AND EXISTS "$ENV{Torch_DIR}/TorchConfig.cmake")
    set(${out} "$ENV{Torch_DIR}" PARENT_SCOPE)
    return()
  endif()
  # An interpreter named on the command line is the user's choice.
  _customlayers_python_torch_dir("${Python3_EXECUTABLE}" dir)
  if(dir)
    set(${out} "${dir}" PARENT_SCOPE)
    return()
  endif()
  # The prefixes find_package(Torch) would search: <prefix>/Torch (torch.utils.cmake_prefix_path, which
  # is <site-packages>/torch/share/cmake) and <prefix>/share/cmake/Torch (a libtorch directory).
  foreach(prefix IN LISTS CMAKE_PREFIX_PATH)
    foreach(dir IN ITEMS "${prefix}/Torch" "${prefix}/share/cmake/Torch")
      if(EXISTS "${dir}/TorchConfig.cmake")
        set(${out} "${dir}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
  if(CUSTOMLAYERS_DEFAULT_TORCH_DIR AND EXISTS "${CUSTOMLAYERS_DEFAULT_TORCH_DIR}/TorchConfig.cmake")
    set(${out} "${CUSTOMLAYERS_DEFAULT_TORCH_DIR}" PARENT_SCOPE)
    return()
  endif()
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 COMPONENTS Interpreter QUIET)
    _customlayers_python_torch_dir("${Python3_EXECUTABLE}" dir)
    if(dir)
      set(${out} "${dir}" PARENT_SCOPE)
      return()
    endif()
  endif()
  message(FATAL_ERROR
    "customlayers: cannot find the Torch CMake package. Pass "
    "-DCMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)'), "
    "or -DPython3_EXECUTABLE=<python with torch>, or -DTorch_DIR=<torch>/share/cmake/Torch, "
    "or add a libtorch directory to CMAKE_PREFIX_PATH.")
endfunction()

# The CUDA version torch was built with ("13.0"), or "" for a CPU build.
function(_customlayers_torch_cuda_version torch_root out)
  set(version "")
  if(EXISTS "${torch_root}/version.py")                       # pip wheel
    file(STRINGS "${torch_root}/version.py" line REGEX "^cuda[:=]")
    if(line MATCHES "'([0-9]+\\.[0-9]+)'")
      set(version "${CMAKE_MATCH_1}")
    endif()
  elseif(EXISTS "${torch_root}/build-version")                # libtorch archive: 2.x.y+cu130
    file(READ "${torch_root}/build-version" build)
    if(build MATCHES "\\+cu([0-9]+)([0-9])")
      set(version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
    endif()
  endif()
  set(${out} "${version}" PARENT_SCOPE)
endfunction()

function(_customlayers_is_toolkit dir out)
  if(dir AND EXISTS "${dir}/bin/nvcc" AND EXISTS "${dir}/include/cuda_runtime.h")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(_customlayers_locate_cuda_toolkit cuda_version out)
  set(candidates "${CUDAToolkit_ROOT}" "${CUDA_TOOLKIT_ROOT_DIR}")
  if(CMAKE_CUDA_COMPILER)
    get_filename_component(bindir "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    list(APPEND candidates "${bindir}/..")
  endif()
  list(APPEND candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" "/usr/local/cuda-${cuda_version}" "/usr/local/cuda")
  foreach(dir IN LISTS candidates)
    _customlayers_is_toolkit("${dir}" ok)
    if(ok)
      # A real path: /usr/local/cuda and nvcc wrapper scripts on PATH must not stand in for the toolkit.
      file(REAL_PATH "${dir}" dir)
      set(${out} "${dir}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out} "" PARENT_SCOPE)
endfunction()

# The GPU architectures torch's package compiles for (TORCH_CUDA_ARCH_LIST, "8.0;8.6;9.0+PTX"). Given
# (environment, -D, or CMAKE_CUDA_ARCHITECTURES), each entry is checked against what the toolkit's nvcc
# supports (`nvcc --list-gpu-arch`), so that a wrong one fails here, with the supported list, rather than in
# nvcc. Not given: CUSTOMLAYERS_DEFAULT_CUDA_ARCHS (setup.py's default, Ampere, Ada, Hopper + PTX) less what
# nvcc does not support. torch's own default would be the visible GPUs, else every architecture torch was
# built for, which includes some (sm_50) that a newer nvcc has dropped.
set(CUSTOMLAYERS_DEFAULT_CUDA_ARCHS "8.0;8.6;8.9;9.0+PTX")

function(_customlayers_nvcc_archs nvcc out)
  set(archs "")
  execute_process(COMMAND "${nvcc}" --list-gpu-arch OUTPUT_VARIABLE listed ERROR_QUIET RESULT_VARIABLE rc)
  if(rc EQUAL 0)
    string(REGEX MATCHALL "compute_[0-9]+[a-z]?" archs "${listed}")
  endif()
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# "9.0+PTX" -> compute_90, "12.0a" -> compute_120a; "" for names nvcc does not list (Ampere, All, ...).
function(_customlayers_arch_to_compute arch out)
  if(arch MATCHES "^([0-9]+)\\.([0-9])([a-z]?)(\\+PTX)?$")
    set(${out} "compute_${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

macro(_customlayers_choose_cuda_archs)
  _customlayers_nvcc_archs("${CMAKE_CUDA_COMPILER}" _cl_nvcc_archs)
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
  endif()
  if(DEFINED TORCH_CUDA_ARCH_LIST AND NOT TORCH_CUDA_ARCH_LIST STREQUAL "")
    string(REPLACE " " ";" TORCH_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
    if(_cl_nvcc_archs)
      foreach(_cl_arch IN LISTS TORCH_CUDA_ARCH_LIST)
        _customlayers_arch_to_compute("${_cl_arch}" _cl_compute)
        string(REGEX REPLACE "[af]$" "" _cl_compute_base "${_cl_compute}")
        if(_cl_compute AND NOT _cl_compute_base IN_LIST _cl_nvcc_archs)
          string(REPLACE ";" " " _cl_listed "${_cl_nvcc_archs}")
          set(_cl_level FATAL_ERROR)
          string(TOUPPER "${CUSTOMLAYERS_WITH_CUDA}" _cl_with_cuda)
          if(_cl_with_cuda STREQUAL "OFF")  # nothing is compiled for it
            set(_cl_level WARNING)
          endif()
          message(${_cl_level} "customlayers: GPU architecture ${_cl_arch} (TORCH_CUDA_ARCH_LIST / "
                  "CMAKE_CUDA_ARCHITECTURES) is not supported by ${CMAKE_CUDA_COMPILER}, which supports: "
                  "${_cl_listed}")
        endif()
      endforeach()
    endif()
    set(_cl_arch_origin "given")
  else()
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_cl_arch IN LISTS CUSTOMLAYERS_DEFAULT_CUDA_ARCHS)
      _customlayers_arch_to_compute("${_cl_arch}" _cl_compute)
      if(NOT _cl_nvcc_archs OR _cl_compute IN_LIST _cl_nvcc_archs)
        list(APPEND TORCH_CUDA_ARCH_LIST "${_cl_arch}")
      endif()
    endforeach()
    if(NOT TORCH_CUDA_ARCH_LIST)
      message(FATAL_ERROR "customlayers: ${CMAKE_CUDA_COMPILER} supports none of the default GPU architectures "
              "(${CUSTOMLAYERS_DEFAULT_CUDA_ARCHS}): set TORCH_CUDA_ARCH_LIST, or -DCUSTOMLAYERS_WITH_CUDA=OFF")
    endif()
    set(_cl_arch_origin "default")
  endif()
  set(CUSTOMLAYERS_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}" CACHE INTERNAL "GPU architectures compiled for")
  message(STATUS "customlayers: GPU architectures ${TORCH_CUDA_ARCH_LIST} (${_cl_arch_origin})")
endmacro()

macro(customlayers_prepare_torch)
  _customlayers_locate_torch_dir(Torch_DIR)
  set(Torch_DIR "${Torch_DIR}" CACHE PATH "Directory of TorchConfig.cmake" FORCE)
  get_filename_component(TORCH_ROOT "${Torch_DIR}/../../.." ABSOLUTE)
  _customlayers_torch_cuda_version("${TORCH_ROOT}" TORCH_CUDA_VERSION)
  set(CUSTOMLAYERS_PIP_CUDA_INCLUDE_DIRS "")

  if(TORCH_CUDA_VERSION)
    # torch's CMake package needs a CUDA toolkit even to link CPU code: without one it stops with
    # "Caffe2 uses CUDA but I cannot find the CUDA libraries".
    _customlayers_locate_cuda_toolkit("${TORCH_CUDA_VERSION}" _cl_toolkit)
    if(NOT _cl_toolkit)
      message(FATAL_ERROR
        "customlayers: torch at ${TORCH_ROOT} is a CUDA ${TORCH_CUDA_VERSION} build, and its CMake package "
        "needs a CUDA toolkit (bin/nvcc, include/cuda_runtime.h), even for a CPU-only library. Set CUDA_HOME "
        "or -DCUDAToolkit_ROOT=<toolkit>, or build against a CPU-only torch.")
    endif()
    set(CUDA_TOOLKIT_ROOT_DIR "${_cl_toolkit}" CACHE PATH "CUDA toolkit used by torch's CMake package")
    set(CUDAToolkit_ROOT "${_cl_toolkit}")
    if(NOT CMAKE_CUDA_COMPILER)
      set(CMAKE_CUDA_COMPILER "${_cl_toolkit}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
    endif()

    # pip-installed CUDA libraries and headers: site-packages/nvidia/<pkg>/{lib,include}.
    get_filename_component(_cl_site "${TORCH_ROOT}/.." ABSOLUTE)
    file(GLOB _cl_pip_includes LIST_DIRECTORIES true "${_cl_site}/nvidia/*/include")
    file(GLOB _cl_pip_libdirs LIST_DIRECTORIES true "${_cl_site}/nvidia/*/lib")
    # For the .cu files: torch's CUDA headers include cublas_v2.h, cusparse.h, ... which a bare toolkit
    # may lack.
    set(CUSTOMLAYERS_PIP_CUDA_INCLUDE_DIRS ${_cl_pip_includes})

    if(NOT CUDA_nvrtc_LIBRARY)
      find_library(_cl_nvrtc nvrtc HINTS "${_cl_toolkit}" PATH_SUFFIXES lib64 lib NO_DEFAULT_PATH)
      if(NOT _cl_nvrtc)
        # pip ships only the versioned name (libnvrtc.so.13), which find_library does not match.
        foreach(_cl_dir IN LISTS _cl_pip_libdirs)
          file(GLOB _cl_nvrtc_candidates "${_cl_dir}/libnvrtc.so.[0-9]*")
          list(FILTER _cl_nvrtc_candidates EXCLUDE REGEX "builtins|alt")
          if(_cl_nvrtc_candidates)
            list(GET _cl_nvrtc_candidates 0 _cl_nvrtc)
            break()
          endif()
        endforeach()
      endif()
      if(_cl_nvrtc)
        set(CUDA_nvrtc_LIBRARY "${_cl_nvrtc}" CACHE FILEPATH "libnvrtc used by torch's CMake package")
      endif()
    endif()
    message(STATUS "customlayers: torch CUDA ${TORCH_CUDA_VERSION}, toolkit ${_cl_toolkit}, "
                   "nvrtc ${CUDA_nvrtc_LIBRARY}")
  endif()

  # A user's CMAKE_CUDA_ARCHITECTURES (90;80) becomes torch's TORCH_CUDA_ARCH_LIST (9.0;8.0), which is what
  # torch's package actually uses (it overrides CMAKE_CUDA_ARCHITECTURES).
  if(CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_cl_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
      if(_cl_arch MATCHES "^([0-9]+)([0-9])([a-z]?)(-real|-virtual)?$")
        list(APPEND TORCH_CUDA_ARCH_LIST "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      endif()
    endforeach()
  endif()
  if(TORCH_CUDA_VERSION)
    _customlayers_choose_cuda_archs()
    # torch's package adds the -gencode flags itself; CMake's own default (its compiler's, e.g. 75), cached by
    # enable_language(CUDA), would otherwise be taken for the user's choice on the next configure.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES OFF CACHE STRING "GPU architectures: TORCH_CUDA_ARCH_LIST decides (torch's package)")
    endif()
  endif()

  # torch's package compiles a CUDA probe with CMAKE_CUDA_STANDARD (default: the C++ standard), and
  # CMake before 3.26 has no C++20 dialect flag for nvcc; the library's own .cu files get C++20 anyway.
  if(NOT DEFINED CMAKE_CUDA_STANDARD)
    set(CMAKE_CUDA_STANDARD 17)
  endif()
endmacro()

macro(customlayers_find_torch)
  customlayers_prepare_torch()
  set(CMAKE_CXX_STANDARD 20)          # torch's headers require C++20
  set(CMAKE_CXX_STANDARD_REQUIRED ON)
  find_package(Torch REQUIRED CONFIG)
endmacro()
