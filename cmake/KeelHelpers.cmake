# Small helpers shared by every component's CMakeLists.txt.

function(keel_add_optional_subdirectory dir)
  if(EXISTS ${CMAKE_SOURCE_DIR}/${dir}/CMakeLists.txt)
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
  set(labels unit)
  if(ARG_LABELS)
    list(APPEND labels ${ARG_LABELS})
  endif()
  gtest_discover_tests(${name} PROPERTIES LABELS "${labels}" DISCOVERY_TIMEOUT 60)
endfunction()
