# Small helpers shared by every component's CMakeLists.txt.

function(keel_add_optional_subdirectory dir)
  if(NOT IS_ABSOLUTE ${dir})
    set(dir ${CMAKE_SOURCE_DIR}/${dir})
  endif()
  if(EXISTS ${dir}/CMakeLists.txt)
    add_subdirectory(${dir})
  endif()
endfunction()

# src/<name> and its unit tests in tests/unit/<name>.
function(keel_add_component name)
  keel_add_optional_subdirectory(src/${name})
  keel_add_optional_subdirectory(tests/unit/${name})
endfunction()

# keel_add_unit_test(NAME sources... LIBS libs...)
# One GoogleTest binary; each test case becomes a ctest entry (gtest_discover_tests).
include(GoogleTest)
function(keel_add_unit_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main)
  # Every test in tests/unit/<component> is labelled `unit` and `<component>` (plus any LABELS given),
  # so `ctest -L disk` selects a component's unit tests too. gtest_discover_tests keeps only the first
  # element of a list-valued LABELS, so the labels go on the directory, which ctest applies to each test.
  get_filename_component(component ${CMAKE_CURRENT_SOURCE_DIR} NAME)
  set_property(DIRECTORY APPEND PROPERTY LABELS unit ${component} ${ARG_LABELS})
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60)
  set_property(GLOBAL APPEND PROPERTY KEEL_SANITIZED_TEST_TARGETS ${name})
endfunction()

# keel_add_fuzz_target(NAME SOURCES src.cc LIBS libs CORPUS dir)
# The source defines LLVMFuzzerTestOneInput. Always builds NAME_replay, which runs every file of the
# corpus through the target once, and registers it as a ctest (label "fuzz"): CI replays the corpus
# under whatever sanitizers the build uses. With -DKEEL_FUZZ=ON and clang, also builds NAME as a real
# libFuzzer binary for fuzzing sessions.
function(keel_add_fuzz_target name)
  cmake_parse_arguments(ARG "" "CORPUS" "SOURCES;LIBS" ${ARGN})
  add_executable(${name}_replay ${ARG_SOURCES} ${CMAKE_SOURCE_DIR}/tests/fuzz/replay_main.cc)
  target_link_libraries(${name}_replay PRIVATE ${ARG_LIBS})
  add_test(NAME fuzz_replay.${name} COMMAND ${name}_replay ${ARG_CORPUS})
  set_tests_properties(fuzz_replay.${name} PROPERTIES LABELS fuzz)
  set_property(GLOBAL APPEND PROPERTY KEEL_SANITIZED_TEST_TARGETS ${name}_replay)
  if(KEEL_FUZZ AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    add_executable(${name} ${ARG_SOURCES})
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(${name} PRIVATE ${ARG_LIBS})
  endif()
endfunction()

# `ninja sanitized-tests`: just the unit-test and fuzz-replay binaries, which is all the ASan build runs.
# Called once at the end of the top-level CMakeLists.txt, after every component has registered.
function(keel_add_sanitized_tests_target)
  get_property(targets GLOBAL PROPERTY KEEL_SANITIZED_TEST_TARGETS)
  add_custom_target(sanitized-tests DEPENDS ${targets})
endfunction()
