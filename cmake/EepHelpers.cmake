# eep_add_library(name SOURCES ... DEPS ...): one static library per room under src/.
function(eep_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
endfunction()

# eep_add_test(name SOURCES ... DEPS ... [LABELS ...]): one gtest binary, registered with ctest.
# Tests run with the repo's tests/data as working data (EEP_TEST_DATA) and the eep binary
# path in EEP_BIN, so CLI contract tests exercise the real executable.
function(eep_add_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    EEP_TEST_DATA="${PROJECT_SOURCE_DIR}/tests/data"
    EEP_BIN="$<TARGET_FILE:eep>")
  add_dependencies(${name} eep)
  add_test(NAME ${name} COMMAND ${name})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT})
  if(ARG_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
endfunction()
